"""Playwright over Debian's Chromium (no browser download): a page that records what went
wrong in it, full-page screenshots into a folder, and what Chart.js draws in a chart.

Every wait in the page (an action's, or an `expect`'s for what the page should come to show)
has a deadline meant for a loaded machine, not Playwright's 5 s: the page shows what the API
answers, and the API shares the machine with workers and other test runs."""

import contextlib
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# The manual's pictures of the dashboard (docs/img/dashboard-*.png) are the browser tests'
# screenshots: GVPO_DOCS_SCREENSHOTS=1 writes them there too (then check them in).
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
VIEWPORT = {"width": 1280, "height": 800}
PAGE_TIMEOUT_MS = 60_000  # an action or an expectation, unless it says otherwise
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Page:
    """The Playwright page, plus what the test wants to know about the session: uncaught
    JavaScript errors and every URL the page asked for."""

    def __init__(self, page, artifacts: Path) -> None:
        self.page, self.artifacts = page, artifacts
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        # what the content security policy blocked (Chromium reports it on the console)
        page.on(
            "console",
            lambda msg: "Content Security Policy" in msg.text and self.errors.append(msg.text),
        )
        page.on("request", lambda request: self.requests.append(request.url))

    def screenshot(self, name: str, element=None, docs: str | None = None) -> Path:
        """The whole page, or one `element` (a locator); `docs`: also the manual's picture
        docs/img/dashboard-{docs}.png when GVPO_DOCS_SCREENSHOTS=1."""
        path = self.artifacts / f"{name}.png"
        if element is None:
            self.page.screenshot(path=path, full_page=True)
        else:
            element.screenshot(path=path)
        if docs and os.environ.get("GVPO_DOCS_SCREENSHOTS") == "1":
            (DOCS_IMG / f"dashboard-{docs}.png").write_bytes(path.read_bytes())
        return path


def chart_datasets(page, chart_id: str) -> dict[str, int]:
    """Points of each dataset Chart.js draws in that chart, by label."""
    return {label: len(points) for label, points in chart_points(page, chart_id).items()}


def chart_points(page, chart_id: str) -> dict[str, list[tuple[float, float, int | None]]]:
    """(x, y, the step it was recorded at) of each point Chart.js draws in that chart, by
    dataset label."""
    drawn = page.evaluate(
        """id => window.Chart
        .getChart(document.querySelector(`#${id} canvas`))
        .data.datasets.map(d => [d.label, d.data.map(p => [p.x, p.y, p.step ?? null])])""",
        chart_id,
    )
    return {label: [tuple(p) for p in points] for label, points in drawn}


def chart_axes(page, chart_id: str) -> dict[str, dict]:
    """Each scale of that chart as Chart.js laid it out: type, min, max, and the user's bounds
    (the zoom: None when the axis fits the data)."""
    return page.evaluate(
        """id => {
        const chart = window.Chart.getChart(document.querySelector(`#${id} canvas`));
        const out = {};
        for (const [name, s] of Object.entries(chart.scales)) {
            const set = chart.options.scales[name];
            out[name] = {type: s.type, min: s.min, max: s.max,
                         user_min: set.min ?? null, user_max: set.max ?? null};
        }
        return out;
    }""",
        chart_id,
    )


@contextmanager
def chromium_page(artifacts: Path):
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: run `make services` (.ci/ensure-services installs "
            "Debian's chromium)"
        )
    from playwright.sync_api import expect, sync_playwright

    artifacts.mkdir(parents=True, exist_ok=True)
    for old in artifacts.glob("*.png"):
        old.unlink()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        page = Page(context.new_page(), artifacts)
        page.page.set_default_timeout(PAGE_TIMEOUT_MS)
        expect.set_options(timeout=PAGE_TIMEOUT_MS)
        try:
            yield page
        except BaseException:
            # the test's own error is the one to report, not a failed screenshot
            with contextlib.suppress(Exception):
                page.screenshot("failure")
            raise
        finally:
            expect.set_options(timeout=None)  # Playwright's own default again
            browser.close()
