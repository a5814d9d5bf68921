"""The inference worker's model pool (workers/serving/pool.py): what it loads, reloads, restarts
and unloads within its memory budget. Its servers here are a recording stand-in for vLLM's
(starting one takes half a minute; tests/test_serving.py starts real ones)."""

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from workers.serving.guard import TOKEN_VARIABLE, RequireServeToken
from workers.serving.pool import (
    GIB,
    SERVER_OVERHEAD_BYTES,
    DoesNotFit,
    ModelFilesMissing,
    ModelPool,
    weights_bytes,
)
from workers.serving.vllm_server import ServerFailed, ServerOptions, VLLMServer

EVENTS: list[tuple[str, str]] = []


class RecordingServer:
    """Starts, reloads and stops only in EVENTS; `fail` names models whose start fails."""

    fail: set[str] = set()

    def __init__(self, name, path, options, need) -> None:
        self.name, self.path, self.need = name, path, need
        self.url, self.running = f"http://server/{name}", False

    def start(self, timeout: float) -> None:
        EVENTS.append(("start", self.name))
        if self.name in self.fail:
            raise ServerFailed(f"vLLM could not serve {self.name}")
        self.running = True

    def alive(self) -> bool:
        return self.running

    def reload(self, path) -> None:
        EVENTS.append(("reload", self.name))
        self.path = path

    def stop(self) -> None:
        EVENTS.append(("stop", self.name))
        self.running = False


@pytest.fixture
def pool(tmp_path, tiny_model_dir):
    EVENTS.clear()
    options = ServerOptions(GIB, None, "t", "127.0.0.1", "127.0.0.1", tmp_path / "logs")
    one = weights_bytes(tiny_model_dir) + GIB + SERVER_OVERHEAD_BYTES
    made = ModelPool(2 * one + 1, options, tmp_path / "cache", 60, RecordingServer)
    yield made
    made.close()


def test_the_least_recently_used_model_makes_room(pool, tiny_model_dir):
    path = str(tiny_model_dir)
    pool.ensure("a", path, 0)
    pool.ensure("b", path, 0)
    pool.ensure("a", path, 0)  # a is used after b
    held = pool.ensure("c", path, 0)
    assert held["model"] == "c" and not held["loading"]
    assert {m["model"] for m in pool.models()} == {"a", "c"}
    assert EVENTS == [("start", "a"), ("start", "b"), ("stop", "b"), ("start", "c")]


def test_newer_weights_are_swapped_in_and_older_asks_keep_them(pool, tiny_model_dir):
    path = str(tiny_model_dir)
    pool.ensure("run_x", path, 3)
    assert pool.ensure("run_x", path, 5)["version"] == 5
    assert pool.ensure("run_x", path, 4)["version"] == 5  # an API that has not seen 5 yet
    assert EVENTS == [("start", "run_x"), ("reload", "run_x")]


def test_a_dead_server_is_started_again(pool, tiny_model_dir):
    pool.ensure("a", str(tiny_model_dir), 0)
    pool.held["a"].server.running = False
    pool.ensure("a", str(tiny_model_dir), 0)
    assert EVENTS == [("start", "a"), ("stop", "a"), ("start", "a")]


def test_what_cannot_be_loaded_is_named_and_holds_nothing(pool, tiny_model_dir, tmp_path):
    with pytest.raises(ModelFilesMissing, match="no longer there"):
        pool.ensure("gone", str(tmp_path / "nothing"), 0)
    pool.budget = GIB
    with pytest.raises(DoesNotFit, match="GVPO_SERVE_MEMORY_GIB"):
        pool.ensure("big", str(tiny_model_dir), 0)
    pool.budget = 10 * GIB
    RecordingServer.fail = {"bad"}
    try:
        with pytest.raises(ServerFailed):
            pool.ensure("bad", str(tiny_model_dir), 0)
    finally:
        RecordingServer.fail = set()
    assert pool.models() == [] and pool.used() == 0


def test_a_vllm_server_is_started_behind_the_serve_token_on_every_route():
    """vLLM's --api-key leaves /pause and /collective_rpc open: our guard closes every route."""

    async def app(scope, receive, send):
        pass

    async def answered(path: str, token: str | None) -> int:
        sent = []

        async def send(message):
            sent.append(message)

        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        scope = {"type": "http", "path": path, "headers": headers, "method": "POST"}
        await guard(scope, None, send)
        return sent[0]["status"] if sent else 200

    os.environ[TOKEN_VARIABLE] = "t0ken"
    try:
        guard = RequireServeToken(app)
    finally:
        del os.environ[TOKEN_VARIABLE]
    for path in ("/pause", "/collective_rpc", "/v1/chat/completions", "/reset_prefix_cache"):
        assert asyncio.run(answered(path, None)) == 401
        assert asyncio.run(answered(path, "wrong")) == 401
        assert asyncio.run(answered(path, "t0ken")) == 200
    assert asyncio.run(answered("/health", None)) == 200
    options = ServerOptions(GIB, None, "t0ken", "127.0.0.1", "127.0.0.1", Path("/tmp"))
    command = VLLMServer("m", Path("/m"), options, GIB).command()
    assert "--middleware" in command and "--api-key" not in command
    assert "workers.serving.guard.RequireServeToken" in command


def test_a_stored_model_is_fetched_into_the_cache(pool, tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_model_dir, store)
    (store / ".gvpo-complete").touch()
    held = pool.ensure("ckpt_x", f"file://{store}", 1)
    local = pool.held["ckpt_x"].server.path
    assert held["version"] == 1 and local.is_relative_to(pool.cache)
    assert weights_bytes(local) == weights_bytes(tiny_model_dir)
    pool.unload("ckpt_x")
    assert not local.exists()
