"""The team dashboard: a static single-page app under /dashboard over the public REST API.

The browser sends the user's API key itself (kept in localStorage); the server only serves files.
Chart.js is vendored (static/vendor/chart.umd.min.js: the UMD build of chart.js 4.6.1 from npm,
unchanged, with its MIT licence), so the page loads nothing from other origins.
"""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"


def _to_index() -> RedirectResponse:
    # The page's relative URLs (app.js, style.css) resolve under /dashboard/ only.
    return RedirectResponse("/dashboard/", status_code=307)


def install(app: FastAPI) -> None:
    app.add_api_route("/dashboard", _to_index, methods=["GET"], include_in_schema=False)
    app.mount("/dashboard", StaticFiles(directory=STATIC_DIR, html=True), name="dashboard")
