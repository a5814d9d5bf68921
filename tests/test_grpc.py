"""The gRPC API through a real server on a loopback port (the API app under uvicorn, with its
grpc.aio server): create a run, watch it stream to completion while a reward model answers over
gRPC, and the status codes, health, reflection and generated-code drift."""

import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from factories import copy_rows, jsonl
from reward_server import Behaviour, RewardServer, ThreadServer

from gvpo.v1 import rewards_pb2, rewards_pb2_grpc, runs_pb2, runs_pb2_grpc
from service.auth.service import create_api_key
from service.db import session_scope
from service.files.service import create_file
from service.main import create_app
from service.rewards.signing import sign
from service.stack import free_port
from workers.execute import execute_run

pytestmark = pytest.mark.both_backends

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(settings):
    """The API (REST and gRPC) on loopback ports; its settings."""
    live = settings.model_copy(update={"webhook_allow_private": True, "api_port": free_port(),
                                       "grpc_port": free_port(), "reaper_interval_s": 0})
    with ThreadServer(create_app(live), port=live.api_port):
        yield live


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


def project(settings, name: str = "grpc-team") -> tuple[str, str]:
    """A new API key and a 32-row training file of its project: (key, file id)."""
    with session_scope(settings.resolved_database_url) as session:
        owner, key = create_api_key(session, name, settings.api_key_pepper)
        file = create_file(session, settings, owner, io.BytesIO(jsonl(copy_rows(32))),
                           "copy.jsonl", "train")
        return key, file.id


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def spec(model_dir, file_id: str, reward: dict | None = None, **training) -> Struct:
    out = Struct()
    out.update({
        "model": {"path": str(model_dir)}, "dataset": {"train_file": file_id},
        "reward": reward or {"type": "builtin", "name": "char_accuracy"},
        "algorithm": {"group_size": 4, "beta": 0.05}, "sampling": {"max_new_tokens": 5},
        "rollout": {"engine": "hf"}, "optimizer": {"lr": 1e-3},
        "training": {"steps": 4, "prompts_per_step": 2, "mini_batches": 2, **training},
    })
    return out


def error_of(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value


def trailing(error: grpc.RpcError) -> dict[str, str]:
    return dict(error.trailing_metadata() or ())


def test_create_watch_to_completion_with_rewards_submitted_over_grpc(server, channel,
                                                                      tiny_model_dir):
    runs, rewards = runs_pb2_grpc.RunsStub(channel), rewards_pb2_grpc.RewardsStub(channel)
    key, file_id = project(server)

    def submit_over_grpc(callback_url: str, body: bytes, signature: str) -> int:
        run_id = callback_url.rstrip("/").split("/")[-2]
        answer = rewards.SubmitRewards(rewards_pb2.SubmitRewardsRequest(run_id=run_id, body=body),
                                       metadata=(("gvpo-signature", signature),))
        assert answer.complete and answer.accepted > 0
        return 200

    behaviour = Behaviour(mode="async", send_callback=submit_over_grpc)
    with RewardServer(behaviour) as reward_model:
        hook = {"type": "webhook", "url": reward_model.url, "mode": "async", "timeout_s": 10}
        created = runs.CreateRun(runs_pb2.CreateRunRequest(
            spec=spec(tiny_model_dir, file_id, hook), idempotency_key="k1"), metadata=bearer(key))
        assert created.created and created.webhook_secret.startswith("whsec_")
        run = created.run
        assert run.status == "queued" and run.total_steps == 4
        assert run.spec["algorithm"]["name"] == "gvpo"  # defaults filled in
        behaviour.secret = created.webhook_secret

        updates, listening = [], threading.Event()

        def watch() -> None:
            for update in runs.WatchRun(runs_pb2.WatchRunRequest(run_id=run.id),
                                        metadata=bearer(key), timeout=120):
                updates.append(update)
                listening.set()

        watcher = threading.Thread(target=watch)
        watcher.start()
        assert listening.wait(10)  # the worker starts once the watch is under way
        outcome = execute_run(server, run.id, "worker-a")
        assert outcome == "succeeded", runs.GetRun(runs_pb2.GetRunRequest(run_id=run.id),
                                                    metadata=bearer(key)).error
        watcher.join(timeout=60)
        assert not watcher.is_alive(), "the stream did not end with the run"

    kinds = [u.WhichOneof("update") for u in updates]
    assert kinds[0] == "run" and updates[0].run.status == "queued"
    events = [u.event.type for u in updates if u.HasField("event")]
    assert events[0] == "run.queued" and events[1] == "run.started"
    assert events[-1] == "run.succeeded"
    steps = [u.metrics for u in updates if u.HasField("metrics")]
    assert [m.step for m in steps] == [1, 2, 3, 4]
    assert all("reward/mean" in m.values and "loss" in m.values for m in steps)
    states = [u.run for u in updates if u.HasField("run")]
    assert states[-1].status == "succeeded" and states[-1].step == 4
    assert states[-1].HasField("finished_at")
    assert set(behaviour.callback_statuses) == {200}  # every reward arrived over gRPC

    # The same run through GetRun, and an idempotent replay of the create.
    again = runs.CreateRun(runs_pb2.CreateRunRequest(
        spec=spec(tiny_model_dir, file_id, hook), idempotency_key="k1"), metadata=bearer(key))
    assert not again.created and again.run.id == run.id and again.webhook_secret == ""
    assert runs.GetRun(runs_pb2.GetRunRequest(run_id=run.id), metadata=bearer(key)).status \
        == "succeeded"
    # A watch that starts after the end replays from the cursors given, then ends.
    late = list(runs.WatchRun(runs_pb2.WatchRunRequest(run_id=run.id, since_step=3,
                                                      after_event_id=10**9),
                              metadata=bearer(key), timeout=30))
    assert [u.WhichOneof("update") for u in late] == ["run", "metrics"]
    assert late[1].metrics.step == 4


def test_status_codes(server, channel, tiny_model_dir):
    runs, rewards = runs_pb2_grpc.RunsStub(channel), rewards_pb2_grpc.RewardsStub(channel)
    key, file_id = project(server)
    other_key, _ = project(server, "another-team")
    run = runs.CreateRun(runs_pb2.CreateRunRequest(spec=spec(tiny_model_dir, file_id)),
                         metadata=bearer(key)).run

    for metadata in ((), bearer("gvpo_sk_wrong"), (("authorization", "Basic x"),)):
        error = error_of(runs.GetRun, runs_pb2.GetRunRequest(run_id=run.id), metadata=metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        assert trailing(error)["gvpo-error-code"] == "unauthorized"
    error = error_of(runs.CreateRun, runs_pb2.CreateRunRequest(spec=Struct()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED

    for call in (runs.GetRun, runs.CancelRun, runs.PauseRun):
        error = error_of(call, runs_pb2.GetRunRequest(run_id=run.id), metadata=bearer(other_key))
        assert error.code() == grpc.StatusCode.NOT_FOUND and run.id in error.details()
    error = error_of(lambda r, **kw: list(runs.WatchRun(r, **kw)),
                     runs_pb2.WatchRunRequest(run_id=run.id), metadata=bearer(other_key))
    assert error.code() == grpc.StatusCode.NOT_FOUND

    bad = spec(tiny_model_dir, file_id)
    bad["algorithm"]["beta"] = -1
    del bad["model"]
    error = error_of(runs.CreateRun, runs_pb2.CreateRunRequest(spec=bad), metadata=bearer(key))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {f["field"] for f in json.loads(trailing(error)["gvpo-error-details"])["fields"]}
    assert fields == {"model", "algorithm.beta"} and "algorithm.beta" in error.details()
    bad = spec(tiny_model_dir, "file_missing")
    error = error_of(runs.CreateRun, runs_pb2.CreateRunRequest(spec=bad), metadata=bearer(key))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "dataset.train_file" in error.details()
    for request in (runs_pb2.ListRunsRequest(page_size=1000),
                    runs_pb2.ListRunsRequest(status="bogus")):
        error = error_of(runs.ListRuns, request, metadata=bearer(key))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

    # State changes: pause, resume, cancel; then cancelling again is refused.
    assert runs.PauseRun(runs_pb2.GetRunRequest(run_id=run.id), metadata=bearer(key)).status \
        == "paused"
    assert runs.ResumeRun(runs_pb2.GetRunRequest(run_id=run.id), metadata=bearer(key)).status \
        == "queued"
    assert runs.CancelRun(runs_pb2.GetRunRequest(run_id=run.id), metadata=bearer(key)).status \
        == "cancelled"
    error = error_of(runs.CancelRun, runs_pb2.GetRunRequest(run_id=run.id), metadata=bearer(key))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert trailing(error)["gvpo-error-code"] == "conflict"

    # Paging: newest first, one at a time.
    second = runs.CreateRun(runs_pb2.CreateRunRequest(spec=spec(tiny_model_dir, file_id)),
                            metadata=bearer(key)).run
    page = runs.ListRuns(runs_pb2.ListRunsRequest(page_size=1), metadata=bearer(key))
    assert [r.id for r in page.runs] == [second.id] and page.next_page_token
    page = runs.ListRuns(runs_pb2.ListRunsRequest(page_size=1, page_token=page.next_page_token),
                         metadata=bearer(key))
    assert [r.id for r in page.runs] == [run.id] and page.next_page_token == ""
    assert [r.id for r in runs.ListRuns(runs_pb2.ListRunsRequest(status="cancelled"),
                                        metadata=bearer(key)).runs] == [run.id]

    # Reward callbacks are signed with the run's webhook secret, not an API key.
    body = json.dumps({"request_id": "rq_x", "rewards": []}).encode()
    for metadata in ((), (("gvpo-signature", sign("whsec_not_the_secret", body)),)):
        error = error_of(rewards.SubmitRewards,
                         rewards_pb2.SubmitRewardsRequest(run_id=run.id, body=body),
                         metadata=metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    error = error_of(rewards.SubmitRewards,
                     rewards_pb2.SubmitRewardsRequest(run_id="run_nope", body=body))
    assert error.code() == grpc.StatusCode.NOT_FOUND

    # A watch of a run that is still queued, stopped by its client.
    watch = runs.WatchRun(runs_pb2.WatchRunRequest(run_id=second.id), metadata=bearer(key))
    assert next(watch).run.status == "queued"
    watch.cancel()

    # Every call above is counted in Prometheus by method and status.
    from prometheus_client.parser import text_string_to_metric_families

    def grpc_counts() -> dict:
        scraped = httpx.get(f"http://127.0.0.1:{server.api_port}/metrics").text
        return {(s.labels["method"], s.labels["code"]): s.value
                for f in text_string_to_metric_families(scraped) if f.name == "gvpo_grpc_requests"
                for s in f.samples if s.name == "gvpo_grpc_requests_total"}

    deadline = time.monotonic() + 10  # the server notices the cancel on its next poll
    while ("/gvpo.v1.Runs/WatchRun", "CANCELLED") not in (counts := grpc_counts()):
        assert time.monotonic() < deadline, {k: v for k, v in counts.items() if "Watch" in k[0]}
        time.sleep(0.1)
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
    created = runs.CreateRun(runs_pb2.CreateRunRequest(spec=spec(tiny_model_dir, file_id)),
                             metadata=bearer(key))
    run_id, secret = created.run.id, created.webhook_secret
    recorder = RunRecorder(server, run_id, "worker-a")
    recorder.claim()
    request_id = "rq_grpc"
    recorder.open_reward_request(request_id, 1, ["smp_a", "smp_b"])

    def submit(rewards_list) -> rewards_pb2.SubmitRewardsResponse:
        body = json.dumps({"request_id": request_id, "rewards": rewards_list}).encode()
        return rewards.SubmitRewards(rewards_pb2.SubmitRewardsRequest(run_id=run_id, body=body),
                                     metadata=(("gvpo-signature", sign(secret, body)),))

    for wrong in ([{"sample_id": "smp_zzz", "reward": 1.0}],
                  [{"sample_id": "smp_a", "reward": "high"}]):
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
    error = error_of(rewards.SubmitRewards,
                     rewards_pb2.SubmitRewardsRequest(run_id=run_id, body=huge))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with session_scope(server.resolved_database_url) as session:
        stored = session.scalar(select(RewardRequest).where(RewardRequest.run_id == run_id))
        assert stored.rewards == {"smp_a": 0.5, "smp_b": 1.0}
        assert session.get(Run, run_id).status == "running"


def test_health_and_reflection(server, channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "gvpo.v1.Runs", "gvpo.v1.Rewards"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    error = error_of(health.Check, health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert error.code() == grpc.StatusCode.NOT_FOUND

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflect.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="gvpo.v1.Runs"),
    ]), timeout=10)
    listed, described = list(answers)
    names = {s.name for s in listed.list_services_response.service}
    assert {"gvpo.v1.Runs", "gvpo.v1.Rewards", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


def test_a_taken_grpc_port_stops_the_api_with_a_clear_message(server):
    from fastapi.testclient import TestClient

    clash = server.model_copy(update={"api_port": free_port()})  # the same gRPC port
    with pytest.raises(RuntimeError) as info:
        with TestClient(create_app(clash)):
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
    runs_proto.write_text(runs_proto.read_text().replace(
        "message GetRunRequest {\n  string run_id = 1;\n",
        "message GetRunRequest {\n  string run_id = 1;\n  bool verbose = 2;\n"))
    drift = subprocess.run(check, cwd=copy, capture_output=True, text=True)
    assert drift.returncode == 1 and "runs_pb2.py" in drift.stderr, drift.stderr
    assert "rewards_pb2.py" not in drift.stderr


def test_spec_numbers_from_a_struct_become_the_spec_types(tiny_model_dir):
    """Struct numbers are doubles: whole ones are accepted as integers, fractional ones are
    refused where an integer is due (never truncated)."""
    from pydantic import ValidationError

    from service.runs.grpc import _spec

    good = runs_pb2.CreateRunRequest(spec=spec(tiny_model_dir, "file_x", steps=7))
    assert _spec(good).training.steps == 7
    bad = runs_pb2.CreateRunRequest(spec=spec(tiny_model_dir, "file_x", steps=7.5))
    with pytest.raises(Exception) as info:
        _spec(bad)
    assert not isinstance(info.value, ValidationError)
    assert info.value.details["fields"][0]["field"] == "training.steps"
    assert json_format.MessageToDict(good.spec)["training"]["steps"] == 7
