"""Playwright over Debian's Chromium (no browser download): a page that records what went
wrong in it, and full-page screenshots into a folder.

Every wait in the page (an action's, or an `expect`'s for what the page should come to show)
has a deadline meant for a loaded machine, not Playwright's 5 s: the page shows what the API
answers, and the API shares the machine with workers and other test runs."""

import contextlib
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
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

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=path, full_page=True)
        return path


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
        context = browser.new_context(
            viewport={"width": 1400, "height": 900}, accept_downloads=True
        )
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
