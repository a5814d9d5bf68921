"""Outbound calls to URLs that users give connect to the address that was checked: one lookup
per call, against a resolver that answers something else to a second lookup (DNS rebinding),
while the request keeps the URL's host name (Host header; SNI and certificate for https)."""

import socket
from datetime import UTC, datetime

import pytest

from gvpo_client.signing import HEADER
from service.config import Settings
from service.contract.outbound import (
    OutboundClient,
    Refused,
    Transient,
    post_signed,
    unreachable,
)
from service.runs.notify import Claim, send

from rebinding import FakeDNS, Receiver, loopback_v6, self_signed

SECRET = "s" * 32
# The first lookup of the name finds the receiver; any later one, an address where nothing
# listens: a call that looked the name up again to connect would be refused.
REBINDING = [("127.0.0.1",), ("127.0.0.2",)]


@pytest.fixture
def dns(monkeypatch):
    def install(answers: dict[str, list[tuple[str, ...]]]) -> FakeDNS:
        fake = FakeDNS(answers)
        monkeypatch.setattr(socket, "getaddrinfo", fake)
        return fake

    return install


def post(url: str, allow_private: bool = True):
    with OutboundClient(allow_private, timeout_s=5.0) as client:
        return post_signed(client, url, b"{}", SECRET, {}, 1024, 5.0)


def test_a_post_connects_to_the_address_that_was_checked(dns):
    fake = dns({"rebind.test": REBINDING})
    with Receiver() as receiver:
        answer = post(f"http://rebind.test:{receiver.port}/hook")
    assert answer.status == 200 and answer.text == "ok"
    assert fake.lookups["rebind.test"] == 1
    [(method, host, headers)] = receiver.requests
    assert method == "POST" and host == f"rebind.test:{receiver.port}"
    assert headers[HEADER].startswith("t=")


def test_each_call_looks_the_host_up_again(dns):
    fake = dns({"rebind.test": [("127.0.0.1",)]})
    with Receiver() as receiver, OutboundClient(True, timeout_s=5.0) as client:
        for _ in range(3):
            post_signed(client, f"http://rebind.test:{receiver.port}/", b"{}", SECRET, {}, 64, 5)
    assert fake.lookups["rebind.test"] == 3 == len(receiver.requests)


def test_a_host_with_any_private_address_is_refused_before_connecting(dns):
    fake = dns({"mixed.test": [("93.184.215.14", "127.0.0.1")]})
    with Receiver() as receiver, pytest.raises(Refused, match="127.0.0.1"):
        post(f"http://mixed.test:{receiver.port}/hook", allow_private=False)
    assert receiver.requests == [] and fake.lookups["mixed.test"] == 1


def test_a_host_that_does_not_resolve_is_transient(dns):
    dns({"gone.test": [()]})
    with pytest.raises(Transient, match="does not resolve"):
        post("http://gone.test/hook")


def test_the_next_checked_address_is_tried_when_one_refuses(dns):
    with Receiver() as receiver:
        fake = dns({"two.test": [("127.0.0.2", "127.0.0.1"), ("127.0.0.2",)]})
        assert post(f"http://two.test:{receiver.port}/").status == 200
    assert fake.lookups["two.test"] == 1 and len(receiver.requests) == 1


@pytest.mark.skipif(not loopback_v6(), reason="this machine has no IPv6 loopback")
def test_an_ipv6_address_is_called_in_brackets_with_the_host_name(dns):
    fake = dns({"six.test": [("::1",), ("127.0.0.2",)]})
    with Receiver("::1") as receiver:
        assert post(f"http://six.test:{receiver.port}/hook").status == 200
    assert fake.lookups["six.test"] == 1
    assert [host for _, host, _ in receiver.requests] == [f"six.test:{receiver.port}"]


def test_https_keeps_the_host_name_for_sni_and_the_certificate(dns, monkeypatch, tmp_path):
    """The connection goes to 127.0.0.1, and the certificate, valid for pinned.test only, is
    verified against the host name: with the address instead, the handshake would fail."""
    cert = self_signed(tmp_path, "pinned.test")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
    fake = dns({"pinned.test": REBINDING, "other.test": [("127.0.0.1",)]})
    with Receiver(cert=cert) as receiver:
        assert post(f"https://pinned.test:{receiver.port}/hook").status == 200
        with pytest.raises(Transient, match="CERTIFICATE_VERIFY_FAILED"):
            post(f"https://other.test:{receiver.port}/hook")  # a name the certificate lacks
    assert fake.lookups["pinned.test"] == 1
    assert receiver.server_names[0] == "pinned.test"
    assert [host for _, host, _ in receiver.requests] == [f"pinned.test:{receiver.port}"]


def test_the_submission_probe_connects_where_it_checked(dns):
    fake = dns({"rebind.test": REBINDING})
    with Receiver() as receiver:
        assert unreachable(f"http://rebind.test:{receiver.port}/score", True) is None
    assert fake.lookups["rebind.test"] == 1
    assert [(m, h) for m, h, _ in receiver.requests] == [("HEAD", f"rebind.test:{receiver.port}")]


def test_a_run_notification_connects_where_it_checked(dns):
    settings = Settings(webhook_allow_private=True, notify_timeout_s=5.0)
    fake = dns({"rebind.test": REBINDING})
    with Receiver() as receiver:
        url = f"http://rebind.test:{receiver.port}/notify"
        claim = Claim("run_x", datetime.now(UTC), 0, url, SECRET, "ntf_x", b"{}")
        outcome = send(settings, claim)
    assert outcome.kind == "ok" and outcome.status == 200
    assert fake.lookups["rebind.test"] == 1
    [(_, host, headers)] = receiver.requests
    assert host == f"rebind.test:{receiver.port}" and headers["GVPO-Event-Id"] == "ntf_x"
