"""The gRPC API through a real server on a loopback port (the API app under uvicorn, with its
grpc.aio server): create a run, watch it stream to completion while a reward model answers over
gRPC, and the status codes, health, reflection and generated-code drift."""

import io
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gvpo.v1 import rewards_pb2, rewards_pb2_grpc, runs_pb2, runs_pb2_grpc
from gvpo_client.signing import sign
from service.auth.service import create_api_key
from service.contract.sources import relative_refusal
from service.db import session_scope
from service.files.service import create_file
from service.main import create_app
from service.stack import free_port
from workers.execute import execute_run

from conftest import BACKENDS, new_settings, release
from factories import (
    EPISODE_METRICS,
    SERVER_START_S,
    TOOL_RUN,
    WORKER_S,
    copy_rows,
    jsonl,
    record_episode_steps,
    run_spec,
    wait_until,
)
from reward_server import Behaviour, RewardServer
from services import serve_api

pytestmark = pytest.mark.both_backends

REPO = Path(__file__).resolve().parents[1]
# How these tests change the copy task: 4 steps, rolled out with transformers.
GRPC_RUN = {"rollout": {"engine": "hf"}, "training": {"steps": 4}}


def live_api(settings):
    """The API (REST and gRPC) on loopback ports, ready; yields its settings."""
    return serve_api(settings, grpc=True, webhook_allow_private=True, reaper_interval_s=0)


@pytest.fixture
def server(settings):
    with live_api(settings) as live:
        yield live


def open_channel(settings) -> grpc.Channel:
    channel = grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=SERVER_START_S)
    return channel


@pytest.fixture
def channel(server):
    with open_channel(server) as ch:
        yield ch


def project(settings, name: str = "grpc-team") -> tuple[str, str]:
    """A new API key and a 32-row training file of its project: (key, file id)."""
    with session_scope(settings.resolved_database_url) as session:
        owner, key = create_api_key(session, name, settings.api_key_pepper)
        file = create_file(
            session, settings, owner, io.BytesIO(jsonl(copy_rows(32))), "copy.jsonl", "train"
        )
        return key, file.id


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def spec(model_dir, file_id: str, **sections) -> Struct:
    """run_spec(..., GRPC_RUN, **sections) as the Struct a CreateRunRequest carries."""
    out = Struct()
    out.update(run_spec(model_dir, file_id, GRPC_RUN, **sections))
    return out


def error_of(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value


def trailing(error: grpc.RpcError) -> dict[str, str]:
    return dict(error.trailing_metadata() or ())


# ---------------------------------------------------------------- a run created and watched


@pytest.fixture(scope="module", params=BACKENDS)
def watched(request, tmp_path_factory, tiny_model_dir):
    """A run created over gRPC (idempotency key "k1") whose rewards an async reward model
    sends back over gRPC, trained by a worker while a WatchRun stream follows it to its end;
    once per back end. The server stays up for the module's tests of it."""
    settings = new_settings(tmp_path_factory.mktemp("grpc"), request.param, request)
    with live_api(settings) as server, open_channel(server) as channel:
        runs, rewards = runs_pb2_grpc.RunsStub(channel), rewards_pb2_grpc.RewardsStub(channel)
        key, file_id = project(server)

        def submit_over_grpc(callback_url: str, body: bytes, signature: str) -> int:
            run_id = callback_url.rstrip("/").split("/")[-2]
            answer = rewards.SubmitRewards(
                rewards_pb2.SubmitRewardsRequest(run_id=run_id, body=body),
                metadata=(("gvpo-signature", signature),),
            )
            assert answer.complete and answer.accepted > 0
            return 200

        behaviour = Behaviour(mode="async", send_callback=submit_over_grpc)
        with RewardServer(behaviour) as reward_model:
            hook = {"type": "webhook", "url": reward_model.url, "mode": "async", "timeout_s": 10}
            created = runs.CreateRun(
                runs_pb2.CreateRunRequest(
                    spec=spec(tiny_model_dir, file_id, reward=hook), idempotency_key="k1"
                ),
                metadata=bearer(key),
            )
            behaviour.secret = created.webhook_secret
            updates, listening = [], threading.Event()

            def watch() -> None:
                for update in runs.WatchRun(
                    runs_pb2.WatchRunRequest(run_id=created.run.id),
                    metadata=bearer(key),
                    timeout=WORKER_S,
                ):
                    updates.append(update)
                    listening.set()

            watcher = threading.Thread(target=watch)
            watcher.start()
            assert listening.wait(SERVER_START_S)  # the worker starts once the watch is under way
            outcome = execute_run(server, created.run.id, "worker-a")
            watcher.join(timeout=WORKER_S)
            assert not watcher.is_alive(), "the stream did not end with the run"
        yield SimpleNamespace(
            runs=runs,
            key=key,
            hook=hook,
            file_id=file_id,
            created=created,
            outcome=outcome,
            updates=updates,
            behaviour=behaviour,
        )
    release(settings)


def test_create_run_answers_the_queued_run_with_its_secret(watched):
    created = watched.created
    assert created.created and created.webhook_secret.startswith("whsec_")
    assert created.run.status == "queued" and created.run.total_steps == 4
    assert created.run.spec["algorithm"]["name"] == "gvpo"  # defaults filled in


def test_rewards_sent_back_over_grpc_train_the_run_to_success(watched):
    run_id = watched.created.run.id
    assert watched.outcome == "succeeded", watched.runs.GetRun(
        runs_pb2.GetRunRequest(run_id=run_id), metadata=bearer(watched.key)
    ).error
    assert set(watched.behaviour.callback_statuses) == {200}  # every reward arrived over gRPC


def test_watch_run_streams_the_run_from_queued_to_its_end(watched):
    updates = watched.updates
    kinds = [u.WhichOneof("update") for u in updates]
    assert kinds[0] == "run" and updates[0].run.status == "queued"
    assert not updates[0].run.HasField("reward")  # no step yet
    events = [u.event.type for u in updates if u.HasField("event")]
    assert events[0] == "run.queued" and events[1] == "run.started"
    assert events[-1] == "run.succeeded"
    steps = [u.metrics for u in updates if u.HasField("metrics")]
    assert [m.step for m in steps] == [1, 2, 3, 4]
    assert all("reward/mean" in m.values and "loss" in m.values for m in steps)
    states = [u.run for u in updates if u.HasField("run")]
    assert states[-1].status == "succeeded" and states[-1].step == 4
    assert states[-1].HasField("finished_at")
    assert states[-1].reward == pytest.approx(steps[-1].values["reward/mean"])


def test_a_replayed_create_answers_the_same_run_without_its_secret(watched, tiny_model_dir):
    runs, run_id = watched.runs, watched.created.run.id
    again = runs.CreateRun(
        runs_pb2.CreateRunRequest(
            spec=spec(tiny_model_dir, watched.file_id, reward=watched.hook), idempotency_key="k1"
        ),
        metadata=bearer(watched.key),
    )
    assert not again.created and again.run.id == run_id and again.webhook_secret == ""
    assert (
        runs.GetRun(runs_pb2.GetRunRequest(run_id=run_id), metadata=bearer(watched.key)).status
        == "succeeded"
    )


def test_a_watch_started_after_the_end_replays_from_its_cursors_then_ends(watched):
    late = list(
        watched.runs.WatchRun(
            runs_pb2.WatchRunRequest(
                run_id=watched.created.run.id, since_step=3, after_event_id=10**9
            ),
            metadata=bearer(watched.key),
            timeout=30,
        )
    )
    assert [u.WhichOneof("update") for u in late] == ["run", "metrics"]
    assert late[1].metrics.step == 4


def test_a_watch_of_a_multi_turn_run_carries_its_episode_metrics(server, tiny_model_dir):
    """Samples are not on gRPC; a multi-turn run's own metrics stream like any other."""
    key, file_id = project(server)
    with open_channel(server) as channel:
        runs = runs_pb2_grpc.RunsStub(channel)
        request = runs_pb2.CreateRunRequest(spec=spec(tiny_model_dir, file_id, **TOOL_RUN))
        run = runs.CreateRun(request, metadata=bearer(key)).run
        assert run.spec["environment"]["name"] == "python_tool"
        record_episode_steps(server, run.id, steps=2)
        updates = list(
            runs.WatchRun(runs_pb2.WatchRunRequest(run_id=run.id), metadata=bearer(key), timeout=30)
        )
    metrics = [u.metrics for u in updates if u.WhichOneof("update") == "metrics"]
    assert [m.step for m in metrics] == [1, 2]
    assert all(set(EPISODE_METRICS) <= set(m.values) for m in metrics)
    assert metrics[0].values["episode/truncated_frac"] == pytest.approx(2 / 3)
    events = [u.event.type for u in updates if u.WhichOneof("update") == "event"]
    states = [u.run.status for u in updates if u.WhichOneof("update") == "run"]
    assert events[-1] == "run.succeeded" and states[-1] == "succeeded"


# ---------------------------------------------------------------- status codes


@pytest.fixture
def stubs(channel):
    return runs_pb2_grpc.RunsStub(channel), rewards_pb2_grpc.RewardsStub(channel)


def created_run(runs, key: str, model_dir, file_id: str):
    return runs.CreateRun(
        runs_pb2.CreateRunRequest(spec=spec(model_dir, file_id)), metadata=bearer(key)
    ).run


def test_calls_without_a_valid_key_are_unauthenticated(server, stubs, tiny_model_dir):
    runs, _ = stubs
    key, file_id = project(server)
    run = created_run(runs, key, tiny_model_dir, file_id)
    for metadata in ((), bearer("gvpo_sk_wrong"), (("authorization", "Basic x"),)):
        error = error_of(runs.GetRun, runs_pb2.GetRunRequest(run_id=run.id), metadata=metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        assert trailing(error)["gvpo-error-code"] == "unauthorized"
    error = error_of(runs.CreateRun, runs_pb2.CreateRunRequest(spec=Struct()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_another_projects_run_is_not_found(server, stubs, tiny_model_dir):
    runs, _ = stubs
    key, file_id = project(server)
    other_key, _ = project(server, "another-team")
    run = created_run(runs, key, tiny_model_dir, file_id)
    for call in (runs.GetRun, runs.CancelRun, runs.PauseRun):
        error = error_of(call, runs_pb2.GetRunRequest(run_id=run.id), metadata=bearer(other_key))
        assert error.code() == grpc.StatusCode.NOT_FOUND and run.id in error.details()
    error = error_of(
        lambda r, **kw: list(runs.WatchRun(r, **kw)),
        runs_pb2.WatchRunRequest(run_id=run.id),
        metadata=bearer(other_key),
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_an_id_no_run_could_have_is_invalid_argument_or_not_found(server, stubs):
    """NUL in an id: PostgreSQL cannot even look it up (its text holds no NUL); never INTERNAL."""
    runs, _ = stubs
    key, _ = project(server)
    for call in (runs.GetRun, runs.CancelRun, runs.PauseRun):
        error = error_of(call, runs_pb2.GetRunRequest(run_id="run_a\x00b"), metadata=bearer(key))
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


def test_bad_requests_are_invalid_argument_naming_the_fields(server, stubs, tiny_model_dir):
    runs, _ = stubs
    key, file_id = project(server)
    bad = spec(tiny_model_dir, file_id)
    bad["algorithm"]["beta"] = -1
    del bad["model"]
    error = error_of(runs.CreateRun, runs_pb2.CreateRunRequest(spec=bad), metadata=bearer(key))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {f["field"] for f in json.loads(trailing(error)["gvpo-error-details"])["fields"]}
    assert fields == {"model", "algorithm.beta"} and "algorithm.beta" in error.details()
    bad = spec(tiny_model_dir, "file_missing")
    error = error_of(runs.CreateRun, runs_pb2.CreateRunRequest(spec=bad), metadata=bearer(key))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset.train_file" in error.details()
    bad = spec("./tiny", file_id)  # read on the server, not where the caller is
    error = error_of(runs.CreateRun, runs_pb2.CreateRunRequest(spec=bad), metadata=bearer(key))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert relative_refusal("model.path") in error.details()
    for request in (
        runs_pb2.ListRunsRequest(page_size=1000),
        runs_pb2.ListRunsRequest(status="bogus"),
    ):
        error = error_of(runs.ListRuns, request, metadata=bearer(key))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_fields_past_the_rest_routes_limits_are_invalid_argument_naming_them(
    server, stubs, tiny_model_dir
):
    """The limits of the REST paths, queries and headers, on the same fields over gRPC."""
    runs, rewards = stubs
    key, file_id = project(server)
    run = created_run(runs, key, tiny_model_dir, file_id)
    long_id = "run_" + "x" * 61
    calls = [
        (runs.GetRun, runs_pb2.GetRunRequest(run_id=long_id), "run_id"),
        (runs.CancelRun, runs_pb2.GetRunRequest(run_id=long_id), "run_id"),
        (runs.ListRuns, runs_pb2.ListRunsRequest(page_token=long_id), "page_token"),
        (
            runs.CreateRun,
            runs_pb2.CreateRunRequest(
                spec=spec(tiny_model_dir, file_id), idempotency_key="k" * 201
            ),
            "idempotency_key",
        ),
        (rewards.SubmitRewards, rewards_pb2.SubmitRewardsRequest(run_id=long_id), "run_id"),
    ]
    for call, request, field in calls:
        error = error_of(call, request, metadata=bearer(key))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error)
        assert field in error.details()
    for cursors, field in (
        ({"after_event_id": -1}, "after_event_id"),
        ({"since_step": 2**31}, "since_step"),
    ):
        stream = runs.WatchRun(
            runs_pb2.WatchRunRequest(run_id=run.id, **cursors), metadata=bearer(key)
        )
        error = error_of(list, stream)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field in error.details()


def test_pause_resume_cancel_and_a_second_cancel_refused(server, stubs, tiny_model_dir):
    runs, _ = stubs
    key, file_id = project(server)
    run = created_run(runs, key, tiny_model_dir, file_id)
    assert (
        runs.PauseRun(runs_pb2.GetRunRequest(run_id=run.id), metadata=bearer(key)).status
        == "paused"
    )
    assert (
        runs.ResumeRun(runs_pb2.GetRunRequest(run_id=run.id), metadata=bearer(key)).status
        == "queued"
    )
    assert (
        runs.CancelRun(runs_pb2.GetRunRequest(run_id=run.id), metadata=bearer(key)).status
        == "cancelled"
    )
    error = error_of(runs.CancelRun, runs_pb2.GetRunRequest(run_id=run.id), metadata=bearer(key))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert trailing(error)["gvpo-error-code"] == "conflict"


def test_list_runs_pages_newest_first_and_filters_by_status(server, stubs, tiny_model_dir):
    runs, _ = stubs
    key, file_id = project(server)
    run = created_run(runs, key, tiny_model_dir, file_id)
    runs.CancelRun(runs_pb2.GetRunRequest(run_id=run.id), metadata=bearer(key))
    second = created_run(runs, key, tiny_model_dir, file_id)
    page = runs.ListRuns(runs_pb2.ListRunsRequest(page_size=1), metadata=bearer(key))
    assert [r.id for r in page.runs] == [second.id] and page.next_page_token
    page = runs.ListRuns(
        runs_pb2.ListRunsRequest(page_size=1, page_token=page.next_page_token), metadata=bearer(key)
    )
    assert [r.id for r in page.runs] == [run.id] and page.next_page_token == ""
    assert [
        r.id
        for r in runs.ListRuns(
            runs_pb2.ListRunsRequest(status="cancelled"), metadata=bearer(key)
        ).runs
    ] == [run.id]


def test_reward_callbacks_are_signed_with_the_runs_secret_not_a_key(server, stubs, tiny_model_dir):
    runs, rewards = stubs
    key, file_id = project(server)
    run = created_run(runs, key, tiny_model_dir, file_id)
    body = json.dumps({"request_id": "rq_x", "rewards": []}).encode()
    for metadata in ((), (("gvpo-signature", sign("whsec_not_the_secret", body)),)):
        error = error_of(
            rewards.SubmitRewards,
            rewards_pb2.SubmitRewardsRequest(run_id=run.id, body=body),
            metadata=metadata,
        )
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    error = error_of(
        rewards.SubmitRewards, rewards_pb2.SubmitRewardsRequest(run_id="run_nope", body=body)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def grpc_counts(settings) -> dict:
    """gvpo_grpc_requests_total from the API's /metrics, by (method, code)."""
    from prometheus_client.parser import text_string_to_metric_families

    scraped = httpx.get(f"http://127.0.0.1:{settings.api_port}/metrics").text
    return {
        (s.labels["method"], s.labels["code"]): s.value
        for f in text_string_to_metric_families(scraped)
        if f.name == "gvpo_grpc_requests"
        for s in f.samples
        if s.name == "gvpo_grpc_requests_total"
    }


def test_every_call_is_counted_in_prometheus_by_method_and_status(server, stubs, tiny_model_dir):
    runs, rewards = stubs
    key, file_id = project(server)
    other_key, _ = project(server, "another-team")
    run = created_run(runs, key, tiny_model_dir, file_id)
    queued = created_run(runs, key, tiny_model_dir, file_id)
    for metadata in ((), bearer("gvpo_sk_wrong"), (("authorization", "Basic x"),)):
        error_of(runs.GetRun, runs_pb2.GetRunRequest(run_id=run.id), metadata=metadata)
    error_of(runs.GetRun, runs_pb2.GetRunRequest(run_id=run.id), metadata=bearer(other_key))
    error_of(
        lambda r, **kw: list(runs.WatchRun(r, **kw)),
        runs_pb2.WatchRunRequest(run_id=run.id),
        metadata=bearer(other_key),
    )
    body = json.dumps({"request_id": "rq_x", "rewards": []}).encode()
    for metadata in ((), (("gvpo-signature", sign("whsec_not_the_secret", body)),)):
        error_of(
            rewards.SubmitRewards,
            rewards_pb2.SubmitRewardsRequest(run_id=run.id, body=body),
            metadata=metadata,
        )
    # A watch of a run that is still queued, stopped by its client.
    watch = runs.WatchRun(runs_pb2.WatchRunRequest(run_id=queued.id), metadata=bearer(key))
    assert next(watch).run.status == "queued"
    watch.cancel()

    def with_the_cancelled_watch() -> dict | None:  # the server notices it on its next poll
        counts = grpc_counts(server)
        return counts if ("/gvpo.v1.Runs/WatchRun", "CANCELLED") in counts else None

    counts = wait_until(with_the_cancelled_watch, SERVER_START_S, "the cancelled watch's count")
    assert counts[("/gvpo.v1.Runs/GetRun", "UNAUTHENTICATED")] == 3
    assert counts[("/gvpo.v1.Runs/GetRun", "NOT_FOUND")] == 1
    assert counts[("/gvpo.v1.Runs/WatchRun", "NOT_FOUND")] == 1
    assert counts[("/gvpo.v1.Runs/CreateRun", "OK")] == 2
    assert counts[("/gvpo.v1.Rewards/SubmitRewards", "UNAUTHENTICATED")] == 2


def test_reward_callback_rules_over_grpc(server, channel, tiny_model_dir):
    """The REST callback's rules, through the same service function: unknown ids and
    non-finite rewards are refused, duplicates accepted once, conflicts refused, and a body
    over the callback limit never reaches the service."""
    from sqlalchemy import select

    from service.models import RewardRequest, Run
    from workers.records import RunRecorder

    runs, rewards = runs_pb2_grpc.RunsStub(channel), rewards_pb2_grpc.RewardsStub(channel)
    key, file_id = project(server)
    created = runs.CreateRun(
        runs_pb2.CreateRunRequest(spec=spec(tiny_model_dir, file_id)), metadata=bearer(key)
    )
    run_id, secret = created.run.id, created.webhook_secret
    recorder = RunRecorder(server, run_id, "worker-a")
    recorder.claim()
    request_id = "rq_grpc"
    recorder.open_reward_request(request_id, 1, ["smp_a", "smp_b"])

    def submit(rewards_list) -> rewards_pb2.SubmitRewardsResponse:
        body = json.dumps({"request_id": request_id, "rewards": rewards_list}).encode()
        return rewards.SubmitRewards(
            rewards_pb2.SubmitRewardsRequest(run_id=run_id, body=body),
            metadata=(("gvpo-signature", sign(secret, body)),),
        )

    for wrong in (
        [{"sample_id": "smp_zzz", "reward": 1.0}],
        [{"sample_id": "smp_a", "reward": "high"}],
    ):
        error = error_of(submit, wrong)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    first = submit([{"sample_id": "smp_a", "reward": 0.5}])
    assert (first.accepted, first.complete) == (1, False)
    assert submit([{"sample_id": "smp_a", "reward": 0.5}]).accepted == 0  # duplicate
    error = error_of(submit, [{"sample_id": "smp_a", "reward": 0.9}])
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "smp_a" in error.details()
    last = submit([{"sample_id": "smp_b", "reward": 1.0}])
    assert (last.accepted, last.complete) == (1, True)

    huge = b" " * (server.max_callback_bytes + 128 * 1024)
    error = error_of(
        rewards.SubmitRewards, rewards_pb2.SubmitRewardsRequest(run_id=run_id, body=huge)
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with session_scope(server.resolved_database_url) as session:
        stored = session.scalar(select(RewardRequest).where(RewardRequest.run_id == run_id))
        assert stored.rewards == {"smp_a": 0.5, "smp_b": 1.0}
        assert session.get(Run, run_id).status == "running"


def test_health_says_serving_for_each_service_once_ready(server, channel):
    """NOT_SERVING from the server's start until its first readiness check passes (never
    NOT_FOUND, as if the service did not exist), then SERVING for each service."""
    health = health_pb2_grpc.HealthStub(channel)
    services = ("", "gvpo.v1.Runs", "gvpo.v1.Rewards")
    known = (health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING)

    def statuses() -> dict:
        answers = {
            s: health.Check(health_pb2.HealthCheckRequest(service=s), timeout=10).status
            for s in services
        }
        assert set(answers.values()) <= set(known), answers
        return answers

    wait_until(
        lambda: set(statuses().values()) == {health_pb2.HealthCheckResponse.SERVING},
        SERVER_START_S,
        "every service to say SERVING",
    )
    error = error_of(health.Check, health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(server, channel):
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflect.ServerReflectionInfo(
        iter(
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="gvpo.v1.Runs"),
            ]
        ),
        timeout=10,
    )
    listed, described = list(answers)
    names = {s.name for s in listed.list_services_response.service}
    assert {"gvpo.v1.Runs", "gvpo.v1.Rewards", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


def test_a_taken_grpc_port_stops_the_api_with_a_clear_message(server):
    from fastapi.testclient import TestClient

    clash = server.model_copy(update={"api_port": free_port()})  # the same gRPC port
    with pytest.raises(RuntimeError) as info, TestClient(create_app(clash)):
        pass
    assert f"cannot serve gRPC on 127.0.0.1:{server.grpc_port} (GVPO_GRPC_PORT)" in str(info.value)


def test_generated_code_matches_the_proto_files(tmp_path):
    check = [sys.executable, "proto/generate.py", "--check"]
    ok = subprocess.run(check, cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # The check can fail: a copy whose .proto gained a field no longer matches its code.
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "proto", copy / "proto", ignore=shutil.ignore_patterns("__pycache__"))
    runs_proto = copy / "proto" / "gvpo" / "v1" / "runs.proto"
    runs_proto.write_text(
        runs_proto.read_text().replace(
            "message GetRunRequest {\n  string run_id = 1;\n",
            "message GetRunRequest {\n  string run_id = 1;\n  bool verbose = 2;\n",
        )
    )
    drift = subprocess.run(check, cwd=copy, capture_output=True, text=True)
    assert drift.returncode == 1 and "runs_pb2.py" in drift.stderr, drift.stderr
    assert "rewards_pb2.py" not in drift.stderr


def test_spec_numbers_from_a_struct_become_the_spec_types(tiny_model_dir):
    """Struct numbers are doubles: whole ones are accepted as integers, fractional ones are
    refused where an integer is due (never truncated)."""
    from pydantic import ValidationError

    from service.runs.grpc import _spec

    good = runs_pb2.CreateRunRequest(spec=spec(tiny_model_dir, "file_x", training={"steps": 7}))
    assert _spec(good).training.steps == 7
    bad = runs_pb2.CreateRunRequest(spec=spec(tiny_model_dir, "file_x", training={"steps": 7.5}))
    with pytest.raises(Exception) as info:
        _spec(bad)
    assert not isinstance(info.value, ValidationError)
    assert info.value.details["fields"][0]["field"] == "training.steps"
    assert json_format.MessageToDict(good.spec)["training"]["steps"] == 7
