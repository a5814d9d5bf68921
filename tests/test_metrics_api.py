"""Reading metrics at scale: GET /v1/runs/{id}/metrics with max_points (each run of steps' lowest
and highest point, from the rollups the worker's recorder keeps), with_time and format=csv,
the list of recorded series, the tokens axis, and sample retention. Steps are recorded through
the worker's recorder, as a run records them."""

import csv
import io
import math
import time

import pytest

from service.contract.spec import RetentionSpec
from service.models.metric import FANOUT, PAGE
from workers.records import RunRecorder

from factories import EXACT_MATCH, assert_error, auth, copy_rows, run_spec, upload

pytestmark = pytest.mark.both_backends

STEPS = 300
NAMES = ("loss", "reward/mean", "grad_norm")
SAMPLE = {"group_index": 0, "sample_index": 0, "prompt": "p", "completion": "c", "answer": "a"}


def value(name: str, step: int) -> float:
    """A jagged series with its extremes at unremarkable steps."""
    return math.sin(step * 1.7 + len(name)) * (1 + step % 37) + 0.01 * step


def new_run(api, key, tiny_model_dir, **sections) -> str:
    train = upload(api, key, copy_rows(4))
    spec = run_spec(tiny_model_dir, train, {"reward": EXACT_MATCH}, sections)
    resp = api.post("/v1/runs", headers=auth(key), json=spec)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def record(settings, run_id: str, steps, tokens: int = 10, retention=None) -> None:
    recorder = RunRecorder(settings, run_id, "worker-metrics")
    assert recorder.claim()[0] is not None
    for step in steps:
        metrics = {name: value(name, step) for name in NAMES}
        samples = [{**SAMPLE, "reward": 1.0}]
        recorder.record_step(step, metrics, samples, tokens, retention)


@pytest.fixture
def recorded(api, make_key, settings, tiny_model_dir):
    key = make_key()
    run_id = new_run(api, key, tiny_model_dir)
    started = time.time()
    record(settings, run_id, range(1, STEPS + 1))
    get = lambda path="", **params: api.get(  # noqa: E731
        f"/v1/runs/{run_id}/metrics{path}", headers=auth(key), params=params
    )
    return get, started, run_id


def expected_extremes(name: str, size: int) -> list[list]:
    """Each bucket of `size` steps' lowest and highest point, oldest first."""
    points = []
    for first in range(0, STEPS + 1, size):
        bucket = [(s, value(name, s)) for s in range(max(first, 1), min(first + size, STEPS + 1))]
        if bucket:
            low = min(bucket, key=lambda p: (p[1], p[0]))
            high = max(bucket, key=lambda p: (p[1], -p[0]))
            points += [list(p) for p in sorted({low, high})]
    return points


def test_max_points_gives_each_run_of_steps_lowest_and_highest_point(recorded):
    get, _, _ = recorded
    full = get(names="loss").json()["metrics"]["loss"]
    assert [p[0] for p in full] == list(range(1, STEPS + 1))

    got = get(names="loss,reward/mean", max_points=40).json()
    assert got["downsampled"] == ["loss", "reward/mean"]
    for name in ("loss", "reward/mean"):
        points = got["metrics"][name]
        # 300 steps in 40 points: buckets of 16 steps (FANOUT**2), two points each
        assert len(points) <= 40
        assert points == expected_extremes(name, FANOUT**2)
        values = [value(name, s) for s in range(1, STEPS + 1)]
        assert min(p[1] for p in points) == pytest.approx(min(values))
        assert max(p[1] for p in points) == pytest.approx(max(values))

    # a series within max_points comes whole; since_step cuts both kinds
    assert get(names="loss", max_points=STEPS).json() == {
        "run_id": get().json()["run_id"],
        "metrics": {"loss": full},
        "downsampled": [],
    }
    late = get(names="loss", max_points=40, since_step=200).json()["metrics"]["loss"]
    # steps 200..300 in 40 points: buckets of 16 again; the one holding step 200 gives its
    # extremes from step 200 on
    assert late == [p for p in expected_extremes("loss", FANOUT**2) if p[0] >= 200]

    # buckets of 4 steps: 76 of them, over several pages of PAGE buckets; since_step=150 (in
    # bucket 37) starts within one
    assert 2 * PAGE < 76 and 37 % PAGE
    fine = get(names="grad_norm", max_points=160).json()["metrics"]["grad_norm"]
    assert fine == expected_extremes("grad_norm", FANOUT)
    fine = get(names="grad_norm", max_points=160, since_step=150).json()["metrics"]["grad_norm"]
    assert fine == [p for p in expected_extremes("grad_norm", FANOUT) if p[0] >= 150]


def test_a_replayed_step_leaves_no_stale_extreme(api, make_key, settings, tiny_model_dir):
    key = make_key()
    run_id = new_run(api, key, tiny_model_dir)
    record(settings, run_id, range(1, 101))
    recorder = RunRecorder(settings, run_id, "worker-metrics")
    recorder.record_step(37, {"loss": -1000.0}, [], 0)
    params = {"names": "loss", "max_points": 16}
    url = f"/v1/runs/{run_id}/metrics"
    points = api.get(url, headers=auth(key), params=params).json()["metrics"]["loss"]
    assert [37, -1000.0] in points
    recorder.record_step(37, {"loss": value("loss", 37)}, [], 0)  # replayed as it was
    points = api.get(url, headers=auth(key), params=params).json()["metrics"]["loss"]
    assert min(p[1] for p in points) == pytest.approx(min(value("loss", s) for s in range(1, 101)))


def test_writers_of_steps_that_share_a_page_lose_none_of_each_others(
    api, make_key, settings, tiny_model_dir
):
    """Steps recorded at once by several writers (a stale worker and its replacement): each
    patches the page its buckets share, and none may write back a copy read before another's
    patch."""
    from concurrent.futures import ThreadPoolExecutor

    key = make_key()
    run_id = new_run(api, key, tiny_model_dir)
    writers = [RunRecorder(settings, run_id, f"worker-{n}") for n in range(4)]

    def write(step: int) -> None:
        writers[step % 4].record_metrics(step, {"loss": value("loss", step)})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(1, STEPS + 1)))  # raises if any write failed
    params = {"names": "loss", "max_points": 160}  # buckets of 4 steps, several pages
    got = api.get(f"/v1/runs/{run_id}/metrics", headers=auth(key), params=params).json()
    assert got["downsampled"] == ["loss"]
    assert got["metrics"]["loss"] == expected_extremes("loss", FANOUT)


def test_points_with_time_csv_and_the_list_of_series(recorded):
    get, started, _ = recorded
    timed = get(names="loss", with_time="true").json()["metrics"]["loss"]
    assert all(len(p) == 3 and started - 1 <= p[2] <= time.time() + 1 for p in timed)
    assert [p[2] for p in timed] == sorted(p[2] for p in timed)

    resp = get(format="csv", names="loss,grad_norm", max_points=40)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(resp.text)))
    assert rows[0] == ["name", "step", "value", "time"]
    by_name = {}
    for name, step, v, t in rows[1:]:
        by_name.setdefault(name, []).append([int(step), float(v)])
        assert started - 1 <= float(t) <= time.time() + 1
    assert by_name["loss"] == expected_extremes("loss", FANOUT**2)

    names = get("/names").json()
    assert names["object"] == "list"
    listed = {n["name"]: n for n in names["data"]}
    assert listed.keys() == {*NAMES, "tokens/total"}
    assert listed["loss"] == {"name": "loss", "points": STEPS, "first_step": 1, "last_step": STEPS}


def test_tokens_total_counts_each_step_once(api, make_key, settings, tiny_model_dir):
    key = make_key()
    run_id = new_run(api, key, tiny_model_dir)
    record(settings, run_id, [1, 2, 3])
    record(settings, run_id, [2, 3, 4])  # replayed after a resume from step 1's checkpoint
    got = api.get(
        f"/v1/runs/{run_id}/metrics", headers=auth(key), params={"names": "tokens/total"}
    ).json()["metrics"]["tokens/total"]
    assert got == [[1, 10.0], [2, 20.0], [3, 30.0], [4, 40.0]]


def test_another_projects_run_and_bad_parameters(api, make_key, tiny_model_dir):
    key = make_key()
    run_id = new_run(api, key, tiny_model_dir)
    get = lambda **params: api.get(  # noqa: E731
        f"/v1/runs/{run_id}/metrics", headers=auth(key), params=params
    )
    assert get().json() == {"run_id": run_id, "metrics": {}, "downsampled": []}
    assert get(max_points=16).json()["metrics"] == {}
    stranger = auth(make_key("team-b"))
    for path in ("", "/names"):
        resp = api.get(f"/v1/runs/{run_id}/metrics{path}", headers=stranger)
        assert_error(resp, 404, "not_found", run_id)
    assert_error(get(max_points=3), 422, "invalid_request", "max_points")
    assert_error(get(format="xml"), 422, "invalid_request", "format")


def test_retention_keeps_every_nth_step_and_the_latest(api, make_key, settings, tiny_model_dir):
    key = make_key()
    kept = {"samples_every_steps": 5, "keep_last_steps": 3}
    run_id = new_run(api, key, tiny_model_dir, retention=kept)
    record(settings, run_id, range(1, 13), retention=RetentionSpec(**kept))
    steps = [
        s
        for s in range(1, 13)
        if api.get(f"/v1/runs/{run_id}/samples", headers=auth(key), params={"step": s}).json()[
            "data"
        ]
    ]
    assert steps == [5, 10, 11, 12]
    # only the latest ones, with no thinned history
    latest = RetentionSpec(samples_every_steps=None, keep_last_steps=2)
    assert [latest.drops(s) for s in (1, 2, 3, 4)] == [None, None, 1, 2]
    assert_error(
        api.post(
            "/v1/runs",
            headers=auth(key),
            json=run_spec(
                tiny_model_dir,
                upload(api, key, copy_rows(4)),
                {"reward": EXACT_MATCH, "retention": {"keep_last_steps": 0}},
            ),
        ),
        422,
        "invalid_request",
        "retention.keep_last_steps",
    )
