"""The dashboard in a real browser (Playwright driving Debian's Chromium) on a live embedded
stack (API and worker processes): log in with a key, watch a running run's reward curve grow,
browse its samples, download a checkpoint through a signed link, overlay GVPO and GRPO reward
curves, pause, resume and cancel the run, and read a multi-turn run's episodes turn by turn.
Screenshots of each stage go to test-artifacts/dashboard/ at the repository's root."""

import itertools
import re
import tarfile
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from browser import chart_datasets, chromium_page
from factories import (
    DROP,
    EPISODE_METRICS,
    STACK_RUN,
    TOOL_RUN,
    WORKER_S,
    auth,
    copy_rows,
    record_episode_steps,
    run_spec,
    upload,
    wait_for_run,
)
from services import cli, stack_settings, start_stack

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "dashboard"
POINTS = "document.querySelector('#chart-reward').dataset.points"
# Waits in the page on what the worker does (milliseconds): a state change that needs a step
# to end or the model to load, and the reward curve's next points (a poll or two apart).
WORKER_MS = int(WORKER_S * 1000)
STEP_MS = 60_000
XSS = '<img src=x onerror="window.injected = true">'


@pytest.fixture
def stack(tmp_path):
    settings = stack_settings(tmp_path / "gvpo")
    cli(settings, "db", "upgrade")
    running = start_stack(settings, tmp_path / "logs")
    yield running
    running.stop()


def submit_runs(http: httpx.Client, model_dir: Path) -> dict[str, str]:
    """Run ids: a short GRPO run, finished; a GVPO run on the same data that trains for minutes,
    running; and a run named with HTML markup, parked on a queue no worker reads."""
    file_id = upload(http, None, copy_rows(32), filename="copy.jsonl")
    base = (STACK_RUN, {"rollout": {"engine": "hf"}})  # no vLLM start-up here
    grpo = run_spec(
        model_dir,
        file_id,
        *base,
        name="copy-grpo",
        training={"steps": 40},
        algorithm={"name": "grpo", "beta": DROP, "reference": DROP},
    )
    ids = {"grpo": http.post("/v1/runs", json=grpo).json()["id"]}
    assert wait_for_run(http, ids["grpo"], {"succeeded", "failed"})["status"] == "succeeded"
    gvpo = run_spec(
        model_dir,
        file_id,
        *base,
        name="copy-gvpo",
        training={"steps": 3000},
        checkpoint={"every_steps": 20, "keep_last": None},
    )
    ids["gvpo"] = http.post("/v1/runs", json=gvpo).json()["id"]
    markup = run_spec(model_dir, file_id, *base, name=XSS, resources={"queue": "parked"})
    ids["markup"] = http.post("/v1/runs", json=markup).json()["id"]
    # the worker takes the GVPO run once it is done with the GRPO one: the page shows it running
    wait_for_run(http, ids["gvpo"], {"running"}, timeout=WORKER_S)
    return ids


def log_in_and_list(browser, url: str, key: str, ids: dict[str, str]) -> None:
    """A wrong key is refused with the API's message; the right one opens the runs table."""
    page = browser.page
    page.goto(f"{url}/dashboard")
    page.fill("#api-key", "gvpo_sk_wrong")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-error")).to_have_text("invalid API key")
    browser.screenshot("00-api-key")
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")
    gvpo, grpo = (page.locator(f'tr[data-run-id="{ids[k]}"]') for k in ("gvpo", "grpo"))
    expect(grpo).to_have_attribute("data-state", "succeeded")
    expect(grpo.locator("td.reward")).to_have_text(re.compile(r"^-?\d"))
    expect(gvpo).to_have_attribute("data-state", "running")
    expect(gvpo).to_contain_text("copy-gvpo")
    assert page.evaluate("localStorage.getItem('gvpo.apiKey')") == key
    # a run's name is text, never markup
    expect(page.locator(f'tr[data-run-id="{ids["markup"]}"] td').nth(2)).to_have_text(XSS)
    assert page.evaluate("window.injected") is None
    browser.screenshot("01-runs")

    rows = page.locator("#runs-body tr[data-run-id]")
    page.select_option("#status-filter", "succeeded")  # the API's filter
    expect(rows).to_have_count(1)
    expect(grpo).to_be_visible()
    page.select_option("#status-filter", "")
    page.fill("#name-filter", "gvpo")  # over the loaded rows
    expect(rows).to_have_count(1)
    expect(gvpo).to_be_visible()
    page.fill("#name-filter", "")


def watch_the_curve_grow(browser, run_id: str) -> None:
    """The running run's reward curve gains points over two polls, each asking only for the
    steps since the last one drawn."""
    page = browser.page
    page.locator(f'tr[data-run-id="{run_id}"] a').click()
    header = page.locator("#run-header")
    expect(header).to_have_attribute("data-state", "running")
    # predicates as functions: an expression string would be eval'd in the page, which the
    # dashboard's content security policy forbids
    more_than = f"(n) => Number({POINTS}) > n"
    page.wait_for_function(more_than, arg=0)
    seen = [int(page.evaluate(POINTS))]
    for _ in range(2):
        page.wait_for_function(more_than, arg=seen[-1], timeout=STEP_MS)
        seen.append(int(page.evaluate(POINTS)))
        expect(header).to_have_attribute("data-state", "running")
    reward = chart_datasets(page, "chart-reward")
    assert seen[0] < seen[1] < seen[2] <= reward["reward/mean"]
    assert reward["± std upper"] == reward["± std lower"] > 0  # the reward/std band
    calls = [
        u
        for u in browser.requests  # the run page's, not the runs table's
        if f"{run_id}/metrics?" in u and "kl%2Fref" in u
    ]
    whole = list(itertools.takewhile(lambda u: "since_step=" not in u, calls))
    assert whole and len(calls) - len(whole) >= 2
    assert all("since_step=" in u for u in calls[len(whole) :])
    assert chart_datasets(page, "chart-loss")["loss"] > 0
    assert chart_datasets(page, "chart-kl")["kl/ref"] > 0
    expect(page.locator("#no-eval")).to_have_text("no eval metrics")
    expect(page.locator("#chart-turns")).to_have_count(0)  # a run with no environment
    browser.screenshot("02-run-live")


def browse_samples(browser, http: httpx.Client, run_id: str) -> None:
    """Step 5's completions and rewards, by group, as the API has them."""
    page = browser.page
    page.fill("#sample-step", "5")
    page.click("#show-samples")
    expect(page.locator("#samples")).to_have_attribute("data-step", "5")
    samples = http.get(f"/v1/runs/{run_id}/samples", params={"step": 5}).json()["data"]
    groups = page.locator("#samples .group")
    expect(groups).to_have_count(len({s["group_index"] for s in samples}))
    expect(page.locator("#samples tr.sample")).to_have_count(len(samples))
    expect(groups.first.locator("code.prompt")).to_have_text(samples[0]["prompt"])
    completion = groups.first.locator("td.completion").first
    expect(completion).to_have_text(samples[0]["completion"] or "(empty)")
    shown = float(groups.first.locator("td.reward").first.inner_text())
    assert shown == pytest.approx(samples[0]["reward"], abs=5e-4)
    page.locator("#sample-browser").scroll_into_view_if_needed()
    browser.screenshot("03-samples")


def download_a_checkpoint(browser, tmp_path: Path) -> None:
    """Through its signed link, with no API key on the download itself: a model archive."""
    page = browser.page
    row = page.locator("#checkpoints-body tr[data-checkpoint]").first
    expect(row).to_be_visible()
    ckpt_id = row.get_attribute("data-checkpoint")
    with page.expect_download() as download:
        row.locator("button.download").click()
    assert f"/{ckpt_id}/download?format=stored&token=" in download.value.url
    assert download.value.suggested_filename == f"{ckpt_id}.tar.gz"
    archive = tmp_path / "ckpt.tar.gz"
    download.value.save_as(archive)
    with tarfile.open(archive) as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names, names
    browser.screenshot("04-checkpoints")


def compare_gvpo_with_grpo(browser, ids: dict[str, str]) -> None:
    """Both runs ticked in the runs table, their reward curves in one chart."""
    page = browser.page
    page.click("nav a[href='#/runs']")
    for run in ("gvpo", "grpo"):
        page.locator(f'tr[data-run-id="{ids[run]}"] input.select-run').check()
    page.click("#compare-selected")
    expect(page.locator("#chart-compare")).to_have_attribute("data-datasets", "2")
    drawn = chart_datasets(page, "chart-compare")
    assert drawn.keys() == {"copy-gvpo · gvpo", "copy-grpo · grpo"}, drawn
    assert drawn["copy-grpo · grpo"] == 40 and drawn["copy-gvpo · gvpo"] > 0
    browser.screenshot("05-compare")


def pause_resume_and_cancel(browser, http: httpx.Client, run_id: str) -> None:
    page = browser.page
    page.locator(f"#compare-summary a[href='#/runs/{run_id}']").click()
    header = page.locator("#run-header")
    expect(header).to_have_attribute("data-state", "running")
    page.click("#pause-run")  # the worker checkpoints and lets go of the run
    expect(header).to_have_attribute("data-state", "paused", timeout=WORKER_MS)
    page.click("#resume-run")  # queued again, until the worker has loaded it
    expect(header).to_have_attribute("data-state", "running", timeout=WORKER_MS)
    page.click("#cancel-run")
    expect(header).to_have_attribute("data-state", "cancelled", timeout=WORKER_MS)
    expect(page.locator("#cancel-run")).to_be_disabled()
    assert http.get(f"/v1/runs/{run_id}").json()["status"] == "cancelled"
    expect(page.locator("#events-body tr[data-type='run.cancelled']")).to_have_count(1)
    browser.screenshot("06-cancelled")


def read_an_episode(browser, http: httpx.Client, stack, model_dir: Path) -> None:
    """A multi-turn run's samples, turn by turn as the API has them: the policy's turns marked
    trained, the tool's answers not; tool calls, what ended each episode and its trained
    tokens. Its episode metrics are drawn beside the others."""
    file_id = upload(http, None, copy_rows(8), filename="tool.jsonl")
    spec = run_spec(model_dir, file_id, STACK_RUN, TOOL_RUN, name="python-tool")
    run_id = http.post("/v1/runs", json=spec).json()["id"]
    record_episode_steps(stack.settings, run_id, steps=2)
    samples = http.get(f"/v1/runs/{run_id}/samples").json()["data"]

    page = browser.page
    page.goto(f"{stack.url}/dashboard/#/runs/{run_id}")
    expect(page.locator("#run-header")).to_have_attribute("data-state", "succeeded")
    expect(page.locator("#samples")).to_have_attribute("data-step", "2")
    rows = page.locator("#samples tr.sample")
    expect(rows).to_have_count(len(samples))
    for row, sample in zip(rows.all(), samples, strict=True):
        turns = row.locator(".turn")
        expect(turns).to_have_count(len(sample["episode"]["turns"]))
        for turn, shown in zip(turns.all(), sample["episode"]["turns"], strict=True):
            expect(turn).to_have_attribute("data-role", shown["role"])
            expect(turn).to_have_attribute("data-trained", str(shown["trained"]).lower())
            mark = "trained" if shown["trained"] else "not trained"
            expect(turn.locator(".train-mark")).to_have_text(f"{mark} · {shown['tokens']} tokens")
        trained, total = sample["episode"]["trained_tokens"], sample["episode"]["tokens"]
        expect(row.locator(".episode .tokens")).to_have_text(f"{trained} of {total} tokens trained")

    done, cut, long = (row.locator(".episode") for row in rows.all())
    expect(done.locator(".end")).to_have_text("done: the environment ended it")
    expect(cut.locator(".end")).to_have_text("truncated at max_turns = 2")
    expect(long.locator(".end")).to_have_text("truncated at max_episode_tokens = 4096")
    expect(done.locator(".turn.trained .tool-call pre")).to_have_text(
        'python({"code": "print(6 * 7)"})'
    )
    expect(done.locator(".turn.masked")).to_contain_text("answers call_0")
    expect(done.locator(".turn").last).to_contain_text("6 * 7 = 42")
    charts = ("chart-turns", "chart-truncated", "chart-environment")
    for chart in charts:
        expect(page.locator(f"#{chart}")).to_have_attribute("data-points", "2")
    drawn = {label for chart in charts for label in chart_datasets(page, chart)}
    assert drawn == set(EPISODE_METRICS), drawn
    page.locator("#sample-browser").scroll_into_view_if_needed()
    browser.screenshot("07-episodes")


def test_dashboard_on_a_live_stack(stack, tiny_model_dir, tmp_path):
    key = cli(stack.settings, "api-key", "create", "--project", "dashboard")
    http = httpx.Client(base_url=stack.url, headers=auth(key), timeout=30)
    ids = submit_runs(http, tiny_model_dir)

    with chromium_page(ARTIFACTS) as browser:
        log_in_and_list(browser, stack.url, key, ids)
        watch_the_curve_grow(browser, ids["gvpo"])
        browse_samples(browser, http, ids["gvpo"])
        download_a_checkpoint(browser, tmp_path)
        compare_gvpo_with_grpo(browser, ids)
        pause_resume_and_cancel(browser, http, ids["gvpo"])
        read_an_episode(browser, http, stack, tiny_model_dir)

        # an id this project does not have: the API's message
        browser.page.goto(f"{stack.url}/dashboard/#/runs/run_elsewhere")
        expect(browser.page.locator("#flash")).to_contain_text(
            "no run 'run_elsewhere' in this project"
        )
        assert browser.errors == []
        foreign = [u for u in browser.requests if not u.startswith((stack.url, "data:"))]
        assert foreign == [], foreign  # everything, Chart.js included, from our own server
