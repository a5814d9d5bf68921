"""The dashboard as a place to watch a run, in a real browser (Playwright driving Debian's
Chromium) on a live embedded stack: a chart for any recorded metric, picked from the list the
API gives; EMA smoothing over the raw values, a log-scale y, x by step, time or tokens, zoom by
drag or Ctrl + wheel and its reset; the run's resolved spec; samples that follow the live step,
with each completion's GVPO weight w_i and log-ratio; events filtered by level, type and text;
and any metric of two runs overlaid, with their specs diffed key by key.

Screenshots go to test-artifacts/dashboard-views/; with GVPO_DOCS_SCREENSHOTS=1 the ones the
manual shows are written to docs/img/dashboard-*.png as well."""

import json
import re
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from browser import chart_axes, chart_points, chromium_page
from factories import (
    STACK_RUN,
    WORKER_S,
    auth,
    copy_rows,
    run_spec,
    upload,
    wait_for_run,
    wait_until,
)
from services import cli, stack_settings, start_stack

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "dashboard-views"
STEP_MS = 60_000  # a step or two of the run, a poll apart
XSS = '<img src=x onerror="window.injected = true">'
SMOOTHING = 0.9


@pytest.fixture
def stack(tmp_path):
    settings = stack_settings(tmp_path / "gvpo")
    cli(settings, "db", "upgrade")
    running = start_stack(settings, tmp_path / "logs")
    yield running
    running.stop()


def submit_runs(http: httpx.Client, model_dir: Path) -> dict[str, str]:
    """Run ids: "short", 12 steps at β 0.05 and lr 1e-3, finished; "long", at β 0.1 and lr
    5e-4, training for minutes; and "markup", named with HTML markup, on a queue no worker
    reads."""
    file_id = upload(http, None, copy_rows(32), filename="copy.jsonl")
    base = (STACK_RUN, {"rollout": {"engine": "hf"}})  # no vLLM start-up here
    short = run_spec(model_dir, file_id, *base, name="beta-0.05", training={"steps": 12})
    ids = {"short": http.post("/v1/runs", json=short).json()["id"]}
    assert wait_for_run(http, ids["short"], {"succeeded", "failed"})["status"] == "succeeded"
    long = run_spec(
        model_dir,
        file_id,
        *base,
        name="beta-0.1",
        algorithm={"beta": 0.1},
        optimizer={"lr": 5e-4},
        training={"steps": 3000},
        checkpoint={"every_steps": 20},
    )
    ids["long"] = http.post("/v1/runs", json=long).json()["id"]
    markup = run_spec(model_dir, file_id, *base, name=XSS, resources={"queue": "parked"})
    ids["markup"] = http.post("/v1/runs", json=markup).json()["id"]
    wait_for_run(http, ids["long"], {"running"}, timeout=WORKER_S)
    return ids


def series(http: httpx.Client, run_id: str, name: str, **params) -> list[list[float]]:
    got = http.get(f"/v1/runs/{run_id}/metrics", params={"names": name, **params})
    return got.json()["metrics"].get(name, [])


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average."""
    out, last = [], 0.0
    for n, value in enumerate(values, start=1):
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight**n))
    return out


def flatten(value, prefix: str = "") -> dict:
    """A spec's leaves by dotted key (list items as [i]); empty objects and lists are leaves."""
    if isinstance(value, dict) and value:
        items = ((f"{prefix}.{k}" if prefix else k, v) for k, v in value.items())
    elif isinstance(value, list) and value:
        items = ((f"{prefix}[{i}]", v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    return {key: leaf for k, v in items for key, leaf in flatten(v, k).items()}


def same_names(http: httpx.Client, run_ids: list[str], offered, attribute: str) -> set[str]:
    """Wait until the page offers (`offered` elements' `attribute`) exactly the names the API
    lists for those runs (a live run may record a new series between the two reads)."""

    def same() -> set[str] | None:
        api = {
            n["name"]
            for run_id in run_ids
            for n in http.get(f"/v1/runs/{run_id}/metrics/names").json()["data"]
        }
        shown = set(offered.evaluate_all("(es, a) => es.map(e => e.getAttribute(a))", attribute))
        return api if shown == api else None

    return wait_until(same, 60, "the page to offer every name the API lists", every=0.5)


def shown_number(text: str) -> float | None:
    return None if text == "—" else float(text)


def set_smoothing(page, weight: float) -> None:
    page.locator("#smoothing").evaluate(
        """(el, w) => { el.value = String(w); el.dispatchEvent(new Event('input')); }""", weight
    )


def open_run(browser, url: str, key: str, run_id: str) -> None:
    page = browser.page
    page.goto(f"{url}/dashboard")
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#runs-body tr[data-run-id]")).to_have_count(3)
    page.goto(f"{url}/dashboard/#/runs/{run_id}")
    expect(page.locator("#run-header")).to_have_attribute("data-state", "running")
    more_than = "(n) => Number(document.querySelector('#chart-loss').dataset.points) > n"
    page.wait_for_function(more_than, arg=3, timeout=STEP_MS)

    # the first load of the charts' series is downsampled by the server, with times; later
    # ones ask only for the steps since the last one seen
    first = next(u for u in browser.requests if f"{run_id}/metrics?" in u and "kl%2Fref" in u)
    assert "max_points=1000" in first and "with_time=true" in first, first
    assert "since_step=" not in first, first
    with page.expect_request(
        lambda r: f"{run_id}/metrics?" in r.url and "kl%2Fref" in r.url and "since_step=" in r.url,
        timeout=STEP_MS,
    ):
        pass  # the next poll's


def pick_a_metric(browser, http: httpx.Client, run_id: str) -> None:
    """The picker offers every series the API has recorded, grouped by prefix; ticking one
    charts it with the API's values, and the search box narrows the list."""
    page = browser.page
    page.click("#metric-picker summary")
    offered = page.locator("#metric-picker label[data-metric]")
    names = same_names(http, [run_id], offered, "data-metric")
    assert {"grad_norm", "time/learn_s", "tokens/total"} <= names, names
    group = page.locator("#metric-picker fieldset[data-group='time']")
    expect(group.locator("label[data-metric='time/learn_s']")).to_have_count(1)
    for chart in ("chart-reward", "chart-loss", "chart-kl"):  # the defaults, ticked
        metric = page.locator(f"#{chart}").get_attribute("data-metric")
        expect(page.locator(f"label[data-metric='{metric}'] input")).to_be_checked()

    expect(page.locator("#chart-m-grad_norm")).to_have_count(0)
    page.locator("label[data-metric='grad_norm'] input").check()
    grad = page.locator("#chart-m-grad_norm")
    expect(grad).to_have_attribute("data-points", re.compile(r"^[1-9]"))
    drawn = chart_points(page, "chart-m-grad_norm")["grad_norm"]
    recorded = {step: value for step, value, *_ in series(http, run_id, "grad_norm")}
    assert [y for _, y, _ in drawn] == pytest.approx([recorded[s] for _, _, s in drawn])

    with page.expect_download() as download:  # the charted series, as the API writes CSV
        page.click("#download-csv")
    assert download.value.suggested_filename == f"{run_id}-metrics.csv"
    csv = Path(download.value.path()).read_text()
    assert all(name in csv for name in ("reward/mean", "loss", "kl/ref", "grad_norm")), csv[:200]

    page.fill("#metric-search", "time/")
    visible = page.locator("#metric-picker label[data-metric]:visible")
    expect(visible).to_have_count(sum(n.startswith("time/") for n in names))
    page.fill("#metric-search", "")
    expect(visible).to_have_count(len(names))


def smooth_and_log(browser, http: httpx.Client, run_id: str) -> None:
    """Smoothing draws the EMA of the raw values, the raw ones behind it; off again, only the
    raw line. Log scale turns the y axis logarithmic."""
    page = browser.page
    set_smoothing(page, SMOOTHING)
    expect(page.locator("#smoothing-value")).to_have_text(f"{SMOOTHING:.2f}")
    drawn = chart_points(page, "chart-loss")  # one read: both lines at the same moment
    smooth, raw = drawn["loss"], drawn["loss (raw)"]
    assert len(smooth) == len(raw) >= 3
    recorded = {step: value for step, value, *_ in series(http, run_id, "loss")}
    assert [y for _, y, _ in raw] == pytest.approx([recorded[s] for _, _, s in raw])
    assert [y for _, y, _ in smooth] == pytest.approx(ema([y for _, y, _ in raw], SMOOTHING))
    assert [y for _, y, _ in smooth] != pytest.approx([y for _, y, _ in raw])
    set_smoothing(page, 0)
    expect(page.locator("#smoothing-value")).to_have_text("off")
    assert "loss (raw)" not in chart_points(page, "chart-loss")

    assert chart_axes(page, "chart-loss")["y"]["type"] == "linear"
    page.check("#log-y")
    assert chart_axes(page, "chart-loss")["y"]["type"] == "logarithmic"
    assert all(y > 0 for _, y, _ in chart_points(page, "chart-loss")["loss"])
    page.uncheck("#log-y")
    assert chart_axes(page, "chart-loss")["y"]["type"] == "linear"


def x_by_tokens_and_time(browser, http: httpx.Client, run_id: str) -> None:
    """x by tokens: each point at the run's tokens/total of its step; by time: its seconds
    since the run's first point, the API's clock; by step again: the steps."""
    page = browser.page
    page.select_option("#x-axis", "tokens")
    tokens = {step: value for step, value, *_ in series(http, run_id, "tokens/total")}
    drawn = [p for p in chart_points(page, "chart-loss")["loss"] if p[2] in tokens]
    assert len(drawn) >= 3
    assert [x for x, _, _ in drawn] == pytest.approx([tokens[s] for _, _, s in drawn])
    assert drawn[-1][0] > drawn[-1][2]  # tokens, not steps

    page.select_option("#x-axis", "time")
    clock = {step: t for step, _, t in series(http, run_id, "loss", with_time="true")}
    drawn = [p for p in chart_points(page, "chart-loss")["loss"] if p[2] in clock]
    assert len(drawn) >= 3 and drawn[0][0] >= 0
    first_x, first_step = drawn[0][0], drawn[0][2]
    since_first = [x - first_x for x, _, _ in drawn]
    assert since_first == pytest.approx([clock[s] - clock[first_step] for _, _, s in drawn])

    page.select_option("#x-axis", "step")
    assert all(x == step for x, _, step in chart_points(page, "chart-loss")["loss"])


def zoom_and_reset(browser) -> None:
    """A drag across a chart zooms every chart of the run to that span; Reset zoom fits the
    data again; so do Ctrl + wheel and a double-click."""
    page = browser.page
    fitted = chart_axes(page, "chart-loss")["x"]
    assert fitted["user_min"] is None
    page.locator("#chart-loss").scroll_into_view_if_needed()
    box = page.locator("#chart-loss canvas").bounding_box()
    area = page.locator("#chart-loss canvas").evaluate(
        "c => { const a = window.Chart.getChart(c).chartArea; return [a.left, a.right]; }"
    )
    y = box["y"] + box["height"] / 2
    left, width = box["x"] + area[0], area[1] - area[0]
    page.mouse.move(left + 0.3 * width, y)
    page.mouse.down()
    page.mouse.move(left + 0.7 * width, y, steps=5)
    page.mouse.up()
    expect(page.locator("#reset-zoom")).to_be_enabled()
    zoomed = chart_axes(page, "chart-loss")["x"]
    assert fitted["min"] < zoomed["min"] < zoomed["max"] < fitted["max"], (fitted, zoomed)
    assert (zoomed["min"], zoomed["max"]) == (zoomed["user_min"], zoomed["user_max"])
    reward = chart_axes(page, "chart-reward")["x"]  # one range for the view's charts
    assert (reward["min"], reward["max"]) == (zoomed["min"], zoomed["max"])
    page.click("#reset-zoom")
    expect(page.locator("#reset-zoom")).to_be_disabled()
    fitted_again = chart_axes(page, "chart-loss")["x"]
    assert fitted_again["user_min"] is None and fitted_again["min"] == fitted["min"]

    page.mouse.move(left + 0.5 * width, y)
    page.keyboard.down("Control")
    page.mouse.wheel(0, -300)
    page.keyboard.up("Control")
    expect(page.locator("#reset-zoom")).to_be_enabled()
    wheeled = chart_axes(page, "chart-loss")["x"]
    assert wheeled["max"] - wheeled["min"] < fitted_again["max"] - fitted_again["min"]
    page.locator("#chart-loss canvas").dblclick(position={"x": area[0] + 5, "y": 20})
    expect(page.locator("#reset-zoom")).to_be_disabled()
    assert chart_axes(page, "chart-loss")["x"]["user_min"] is None


def read_the_config(browser, http: httpx.Client, run_id: str, model_dir: Path) -> None:
    """The resolved spec as YAML: every section, the values the run was given and the ones
    the service filled in."""
    page = browser.page
    spec = http.get(f"/v1/runs/{run_id}").json()["spec"]
    page.click("#run-config summary")
    yaml = page.locator("#config-yaml")
    expect(yaml).to_be_visible()
    lines = yaml.inner_text().splitlines()
    assert [line.rstrip(":").split(":")[0] for line in lines if not line.startswith(" ")] == [*spec]
    assert "  beta: 0.1" in lines and "  lr: 0.0005" in lines
    assert f"  path: {model_dir}" in lines
    assert f"  group_size: {spec['algorithm']['group_size']}" in lines  # a default filled in
    browser.screenshot("config", page.locator("#run-config"), docs="config")
    page.click("#run-config summary")


def follow_the_samples(browser, http: httpx.Client, run_id: str) -> None:
    """The sample browser follows the run's latest step on its own; each completion shows its
    reward, GVPO weight and log-ratio as the API has them. Choosing a step stops following;
    "latest" follows again."""
    page = browser.page
    follow, shown = page.locator("#follow-samples"), page.locator("#samples")
    expect(follow).to_be_checked()
    expect(shown).to_have_attribute("data-step", re.compile(r"^\d+$"))
    first = int(shown.get_attribute("data-step"))
    page.wait_for_function(
        "(n) => Number(document.querySelector('#samples').dataset.step) > n",
        arg=first,
        timeout=STEP_MS,
    )
    step = int(shown.get_attribute("data-step"))
    samples = http.get(f"/v1/runs/{run_id}/samples", params={"step": step}).json()["data"]
    rows = page.locator("#samples tr.sample")
    expect(rows).to_have_count(len(samples))
    for column in ("reward", "weight", "logratio"):
        cells = rows.locator(f"td.{column}").all_inner_texts()
        got = [shown_number(text) for text in cells]
        want = [s[column] for s in samples]
        assert [g is None for g in got] == [w is None for w in want], (column, got, want)
        assert [g for g in got if g is not None] == pytest.approx(
            [w for w in want if w is not None], abs=5e-4, rel=1e-2
        )
    # a GVPO run records the weights and log-ratios of the groups it trained on
    assert any(s["weight"] is not None for s in samples), samples
    assert any(s["logratio"] is not None for s in samples), samples
    page.locator("#sample-browser").scroll_into_view_if_needed()
    browser.screenshot("samples", page.locator("#sample-browser"), docs="samples")

    page.fill("#sample-step", "2")
    page.click("#show-samples")
    expect(follow).not_to_be_checked()
    expect(shown).to_have_attribute("data-step", "2")
    at = http.get(f"/v1/runs/{run_id}").json()["step"]
    wait_until(lambda: http.get(f"/v1/runs/{run_id}").json()["step"] > at + 1, 60, "two steps")
    shown_step = "Number(document.querySelector('#run-step').textContent.match(/\\d+/)[0])"
    page.wait_for_function(f"(s) => {shown_step} >= s", arg=at + 2, timeout=STEP_MS)
    expect(shown).to_have_attribute("data-step", "2")  # not followed
    page.click("#latest-samples")
    expect(follow).to_be_checked()
    expect(shown).to_have_attribute("data-step", re.compile(r"^\d\d+$"))


def filter_the_events(browser) -> None:
    """Level, type (each offered as the log has them) and text each hide the other rows."""
    page = browser.page
    rows = page.locator("#events-body tr")
    visible = page.locator("#events-body tr:visible")
    page.wait_for_function("() => document.querySelectorAll('#event-type option').length > 3")
    types = rows.evaluate_all("rs => rs.map(r => r.dataset.type)")
    assert "run.started" in types and len(set(types)) >= 3, types
    page.select_option("#event-type", "run.started")
    expect(visible).to_have_count(types.count("run.started"))
    expect(visible.first).to_have_attribute("data-type", "run.started")
    expect(page.locator("#events-count")).to_contain_text(f"{types.count('run.started')} of ")
    page.select_option("#event-type", "")
    page.select_option("#event-level", "info")
    levels = rows.evaluate_all("rs => rs.map(r => r.dataset.level)")
    expect(visible).to_have_count(levels.count("info"))
    page.select_option("#event-level", "")
    page.fill("#event-text", "no event says this")
    expect(visible).to_have_count(0)
    page.fill("#event-text", "Loaded the MODEL")  # run.model_loaded's message, in any case
    expect(visible).to_have_count(types.count("run.model_loaded"))
    expect(visible.first).to_have_attribute("data-type", "run.model_loaded")
    page.fill("#event-text", "run.")
    page.locator("#events").scroll_into_view_if_needed()
    browser.screenshot("events", page.locator("#events"), docs="events")
    page.fill("#event-text", "")


def compare_any_metric(browser, http: httpx.Client, ids: dict[str, str]) -> None:
    """Two runs' loss in one chart, under the same controls; their specs diffed key by key:
    exactly the keys whose values differ, changed values side by side. Names stay text."""
    page = browser.page
    page.goto(page.url.split("#")[0] + f"#/compare?runs={ids['long']},{ids['short']}")
    chart = page.locator("#chart-compare")
    expect(chart).to_have_attribute("data-datasets", "2")
    same_names(http, [ids["long"], ids["short"]], page.locator("#compare-metric option"), "value")
    page.select_option("#compare-metric", "loss")
    expect(chart).to_have_attribute("data-metric", "loss")
    assert page.url.endswith("&metric=loss")  # a link to the view keeps the metric
    page.reload()
    expect(chart).to_have_attribute("data-metric", "loss")
    expect(page.locator("#compare-metric")).to_have_value("loss")
    expect(chart.locator("figcaption")).to_have_text("loss")
    short_label = "beta-0.05 · gvpo"
    page.wait_for_function(
        """(label) => window.Chart.getChart(document.querySelector('#chart-compare canvas'))
        .data.datasets.some(d => d.label === label && d.data.length === 12)""",
        arg=short_label,
    )
    drawn = chart_points(page, "chart-compare")
    assert drawn.keys() == {"beta-0.1 · gvpo", short_label}, drawn.keys()
    recorded = [value for _, value, *_ in series(http, ids["short"], "loss")]
    assert [y for _, y, _ in drawn[short_label]] == pytest.approx(recorded)
    assert len(drawn["beta-0.1 · gvpo"]) > 12
    set_smoothing(page, 0.5)  # the controls apply here too
    assert {"beta-0.1 · gvpo (raw)", f"{short_label} (raw)"} <= chart_points(
        page, "chart-compare"
    ).keys()

    specs = [http.get(f"/v1/runs/{ids[run]}").json()["spec"] for run in ("long", "short")]
    a, b = (flatten(spec) for spec in specs)
    differ = {k for k in a.keys() | b.keys() if k not in a or k not in b or a[k] != b[k]}
    assert {"name", "algorithm.beta", "optimizer.lr", "training.steps"} <= differ, differ
    rows = page.locator("#spec-diff tr[data-key]")
    expect(rows).to_have_count(len(differ))
    assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.key)")) == differ
    beta = page.locator("#spec-diff tr[data-key='algorithm.beta']")
    expect(beta).to_have_attribute("data-change", "changed")
    expect(beta.locator("td")).to_have_text(["algorithm.beta", "0.1", "0.05"])
    lr = page.locator("#spec-diff tr[data-key='optimizer.lr']")
    expect(lr.locator("td")).to_have_text(["optimizer.lr", "0.0005", "0.001"])
    expect(page.locator("#diff-summary")).to_have_text(
        f"{len(differ)} of {len(a.keys() | b.keys())} keys differ"
    )
    browser.screenshot("compare", page.locator("section.compare"), docs="compare")
    browser.screenshot("spec-diff", page.locator("#spec-diff-panel"), docs="spec-diff")
    page.check("#diff-all")
    expect(rows).to_have_count(len(a.keys() | b.keys()))
    expect(page.locator("#spec-diff tr[data-key='model.path']")).to_have_attribute(
        "data-change", "same"
    )

    # a run's name is text in the chart's legend, the table and the diff, never markup
    page.goto(page.url.split("#")[0] + f"#/compare?runs={ids['short']},{ids['markup']}")
    expect(page.locator("#compare-summary tr a").nth(1)).to_have_text(XSS)
    expect(page.locator("#diff-b option")).to_have_count(2)
    expect(page.locator("#spec-diff tr[data-key='name'] td").nth(2)).to_have_text(json.dumps(XSS))
    assert page.evaluate("window.injected") is None


def test_watching_a_run_in_the_dashboard(stack, tiny_model_dir):
    key = cli(stack.settings, "api-key", "create", "--project", "views")
    http = httpx.Client(base_url=stack.url, headers=auth(key), timeout=30)
    ids = submit_runs(http, tiny_model_dir)

    with chromium_page(ARTIFACTS) as browser:
        open_run(browser, stack.url, key, ids["long"])
        pick_a_metric(browser, http, ids["long"])
        smooth_and_log(browser, http, ids["long"])
        x_by_tokens_and_time(browser, http, ids["long"])
        zoom_and_reset(browser)
        set_smoothing(browser.page, 0.6)
        browser.page.mouse.move(0, 0)  # no tooltip in the picture
        browser.screenshot("curves", browser.page.locator("#curves"), docs="curves")
        set_smoothing(browser.page, 0)
        read_the_config(browser, http, ids["long"], tiny_model_dir)
        follow_the_samples(browser, http, ids["long"])
        filter_the_events(browser)
        compare_any_metric(browser, http, ids)

        assert browser.page.evaluate("window.injected") is None
        assert browser.errors == []
