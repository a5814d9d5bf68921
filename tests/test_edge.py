"""What every request meets before a route (service/edge.py): NUL in a path or query is a 400
naming it, and every answer carries the security headers, the dashboard its content policy."""

import pytest

from factories import assert_error, auth


@pytest.mark.both_backends
@pytest.mark.parametrize(
    "path", ["/v1/runs/run_a%00b", "/v1/files/file_%00", "/v1/runs/run_x/events?after=1%00"]
)
def test_nul_in_an_id_or_a_query_is_a_400_naming_it(api, make_key, path):
    assert_error(api.get(path, headers=auth(make_key())), 400, "bad_request", "NUL")


@pytest.mark.parametrize("path", ["/dashboard/", "/dashboard/app.js", "/healthz", "/v1/runs"])
def test_no_page_can_be_framed_and_the_dashboard_loads_only_its_own_files(api, path):
    headers = api.get(path).headers
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    policy = headers.get("content-security-policy", "")
    if path.startswith("/dashboard"):
        assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
