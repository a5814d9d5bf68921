"""For the outbound-call tests: a resolver that answers what the test says (a DNS server that
rebinds a name between lookups), and a loopback receiver that records what reached it.

FakeDNS stands in for `socket.getaddrinfo`, the stdlib resolver that httpx's connections use
too, so a second lookup anywhere (a check, then a connect) would see its next answer. Names it
does not know go to the real resolver.
"""

import datetime
import socket
import ssl
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_REAL_GETADDRINFO = socket.getaddrinfo


class FakeDNS:
    """`answers[name]` lists the answer to each lookup of `name` in turn (the last one again
    and again); an answer is a tuple of addresses, () for "does not resolve". Install it with
    monkeypatch.setattr(socket, "getaddrinfo", dns); `lookups` counts the lookups per name."""

    def __init__(self, answers: dict[str, list[tuple[str, ...]]]) -> None:
        self.answers, self.lookups = answers, Counter()

    def __call__(self, host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return _REAL_GETADDRINFO(host, port, *args, **kwargs)
        turns = self.answers[name]
        answer = turns[min(self.lookups[name], len(turns) - 1)]
        self.lookups[name] += 1
        if not answer:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [info for ip in answer for info in _REAL_GETADDRINFO(ip, port, *args, **kwargs)]


class Receiver:
    """A loopback HTTP server (HTTPS with `cert`: (certificate, key) files) that answers 200 to
    any request and records each: (method, Host header, headers); for HTTPS also the server
    name (SNI) each client asked for. `with` serves it in a thread; `port` is the system's."""

    def __init__(self, host: str = "127.0.0.1", cert: tuple[Path, Path] | None = None) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.server_names: list[str | None] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append((self.command, self.headers["Host"], dict(self.headers)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(b"ok")

            do_GET = do_HEAD = do_POST = answer

            def log_message(self, *args) -> None:
                pass

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
        self.server = server_class((host, 0), Handler)
        self.port = self.server.server_address[1]
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*cert)
            context.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
            # The handshake happens in the request's thread, not in the accepting one.
            self.server.socket = context.wrap_socket(
                self.server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for DNS name `name`, signed by its own key: (certificate, key) files. A
    client trusts it when SSL_CERT_FILE names the certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def loopback_v6() -> bool:
    """Whether this machine has IPv6 loopback (::1) to serve on."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True
