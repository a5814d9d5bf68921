"""The python_tool environment and its sandbox (workers/sandbox.py): what the policy's code
cannot do to the host (reach the network, write outside its scratch directory, read the data
directory, outgrow its processes, time, memory or output), each checked on the host, and the
environment still answering afterwards; then how the environment reads calls and replies.

Needs bubblewrap (`make services` installs it).
"""

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from service.contract.environments import PythonToolParams
from workers.environments.base import EpisodeView
from workers.environments.python_tool import PythonToolEnvironment
from workers.sandbox import Stop, run_python

from factories import WORKER_S, wait_until
from services import process_tree

LIMITS = PythonToolParams(
    timeout_s=2, cpu_s=1, memory_mb=256, processes=8, file_size_mb=1, max_output_chars=500
)
ANSWER = "42\n[exit 0]"
FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


@pytest.fixture(scope="module")
def host_dir():
    """A directory of the host that anyone may write to, outside the places the sandbox hides
    by default when the tests can make one there (under / as root), else in the temp dir."""
    base = "/" if os.access("/", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="gvpo-sandbox-test-", dir=base))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def data_dir(host_dir) -> Path:
    """The service's data directory, with a secret anyone on the host may read."""
    path = host_dir / "data"
    path.mkdir(mode=0o777)
    path.chmod(0o777)
    secret = path / "secret_key"
    secret.write_text("the service's secret")
    secret.chmod(0o666)
    return path


@pytest.fixture(scope="module")
def env(data_dir):
    if shutil.which("bwrap") is None:
        pytest.fail(
            "bubblewrap (bwrap) is not installed: run `make services` (.ci/ensure-services)"
        )
    environment = PythonToolEnvironment(LIMITS, data_dir=data_dir, concurrency=4)
    yield environment
    environment.close()


def episode(message: dict, n: int = 0) -> EpisodeView:
    prompt = {"role": "user", "content": "Compute something."}
    return EpisodeView(f"ep_{n}", "grp_0", {}, [prompt, message])


def tool_call(code: str, call_id: str = "call_1", name: str = "python") -> dict:
    arguments = json.dumps({"code": code})
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def calling(*calls: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": list(calls)}


def tool(env: PythonToolEnvironment, code: str) -> str:
    """What the policy reads back after calling the tool with `code`."""
    (reply,) = env.step(1, 1, [episode(calling(tool_call(code)))], "train")
    assert not reply.done
    (message,) = reply.messages
    return message["content"]


def still_answers(env: PythonToolEnvironment) -> bool:
    return tool(env, "print(6 * 7)") == ANSWER


# -- the host is untouched -----------------------------------------------------------------


def test_normal_code_prints_its_result(env):
    assert tool(env, "import math\nprint(math.factorial(5))") == "120\n[exit 0]"


def test_a_failing_call_reports_its_traceback_and_exit_code(env):
    said = tool(env, "1 / 0")
    assert "ZeroDivisionError" in said and said.endswith("[exit 1]")
    assert still_answers(env)


def test_no_connection_reaches_a_server_on_the_hosts_loopback(env):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        said = tool(env, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 1)")
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing came
    assert "ConnectionRefusedError" in said and said.endswith("[exit 1]")
    assert still_answers(env)


def test_no_connection_reaches_a_public_address(env):
    said = tool(env, "import socket\nsocket.create_connection(('1.1.1.1', 53), 1)")
    assert "Network is unreachable" in said and said.endswith("[exit 1]")
    assert still_answers(env)


def test_a_write_outside_the_scratch_directory_fails(env, host_dir):
    kept = host_dir / "kept"
    kept.write_text("the host's")
    code = (
        "import os\n"
        f"for path in ({str(host_dir / 'new')!r}, '/etc/new', '/usr/new'):\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__)\n"
        f"os.remove({str(kept)!r})\n"
    )
    said = tool(env, code)
    assert said.startswith("OSError\nOSError\nOSError\n") and said.endswith("[exit 1]")
    assert "Read-only file system" in said  # the removal
    assert not (host_dir / "new").exists() and not Path("/etc/new").exists()
    assert kept.read_text() == "the host's"
    assert still_answers(env)


def test_the_scratch_directory_is_writable_and_its_files_stay_there(env):
    code = "open('notes.txt', 'w').write('x')\nprint(open('/tmp/notes.txt').read())"
    assert tool(env, code) == "x\n[exit 0]"
    assert tool(env, "import os\nprint(os.path.exists('notes.txt'))") == "False\n[exit 0]"


def test_the_data_directory_is_hidden(env, data_dir):
    said = tool(env, f"print(open({str(data_dir / 'secret_key')!r}).read())")
    assert "FileNotFoundError" in said and "the service's secret" not in said
    said = tool(env, f"open({str(data_dir / 'planted')!r}, 'w').write('x')")
    assert not (data_dir / "planted").exists()
    assert still_answers(env)


def test_the_workers_environment_variables_are_not_passed_on(env, monkeypatch):
    monkeypatch.setenv("GVPO_SECRET_KEY", "a worker's secret")
    said = tool(env, "import os\nprint(sorted(os.environ))")
    assert "GVPO_SECRET_KEY" not in said and said.endswith("[exit 0]")


def test_a_fork_bomb_is_stopped_and_leaves_no_process_behind(env):
    """Its processes never outnumber the limit (RLIMIT_NPROC, counted in the sandbox's user
    namespace), and none outlives the call."""
    # what this process already runs (a Redis of the session's, say) is not the sandbox's
    ours, seen, running = os.getpid(), [], threading.Event()
    before = process_tree(ours)
    running.set()

    def watch() -> None:
        while running.is_set():
            seen.append(len(process_tree(ours)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        said = tool(env, FORK_BOMB)
    finally:
        running.clear()
        watcher.join()
    # stopped by whichever limit it reaches first (CPU time on a machine with cores to spare)
    assert said.endswith(("[killed: time limit 2 s]", "[killed: CPU time limit 1 s]"))
    # bwrap outside the sandbox and its init inside, then the code's processes
    assert max(seen) <= len(before) + 2 + LIMITS.processes
    gone = wait_until(lambda: process_tree(ours) == before, WORKER_S, "the sandbox to be gone")
    assert gone and still_answers(env)


def test_an_endless_loop_is_killed_at_the_time_limit(env):
    before = process_tree(os.getpid())
    said = tool(env, "print('started')\nimport time\nwhile True:\n    time.sleep(0.01)")
    assert said == "started\n[killed: time limit 2 s]"  # killed for its wall time, not ended
    gone = wait_until(
        lambda: process_tree(os.getpid()) == before, WORKER_S, "the sandbox to be gone"
    )
    assert gone and still_answers(env)


def test_a_busy_loop_is_stopped_at_the_cpu_limit():
    limits = LIMITS.model_copy(update={"timeout_s": 10, "cpu_s": 1})
    result = run_python("while True:\n    pass", limits)
    assert result.stopped is Stop.CPU and result.elapsed_s < 5
    assert result.status(limits) == "[killed: CPU time limit 1 s]"


def test_a_10_gb_allocation_fails(env):
    said = tool(env, "data = bytearray(10 * 1024**3)")
    assert "MemoryError" in said and said.endswith("[out of memory: limit 256 MB]")
    assert still_answers(env)


def test_a_file_past_the_size_limit_is_refused(env):
    said = tool(env, "open('big', 'wb').write(b'x' * (2 * 1024 * 1024))")
    assert "File too large" in said and said.endswith("[exit 1]")


def test_the_output_is_cut_to_its_limit(env):
    said = tool(env, "print('start')\nprint('x' * 100_000)\nprint('end')")
    output, status = said.rsplit("\n", 1)
    assert status == "[exit 0]"
    assert output.startswith("start\nxxx") and output.endswith("xxx\nend")
    assert "bytes of output cut" in output
    assert len(output) < LIMITS.max_output_chars + 60


def test_the_code_reads_the_stdin_it_is_given():
    result = run_python("print(input().upper())", LIMITS, stdin="hello\n")
    assert (result.exit_code, result.output) == (0, "HELLO\n")


# -- calls and replies -----------------------------------------------------------------------


def test_a_tool_call_is_answered_with_its_id_and_the_episode_goes_on(env):
    (reply,) = env.step(3, 1, [episode(calling(tool_call("print(6 * 7)", "call_7")))], "train")
    assert reply.messages == [{"role": "tool", "content": ANSWER, "tool_call_id": "call_7"}]
    assert not reply.done and reply.reward is None


def test_a_turn_without_a_call_ends_the_episode(env):
    (reply,) = env.step(3, 2, [episode({"role": "assistant", "content": "It is 42."})], "train")
    assert reply.done and reply.messages == [] and reply.reward is None


def test_without_done_without_call_a_turn_without_a_call_is_told_to_call(data_dir):
    params = LIMITS.model_copy(update={"done_without_call": False})
    environment = PythonToolEnvironment(params, data_dir=data_dir)
    try:
        (reply,) = environment.step(
            1, 1, [episode({"role": "assistant", "content": "Hm."})], "eval"
        )
    finally:
        environment.close()
    assert not reply.done
    assert [m["role"] for m in reply.messages] == ["user"]


def test_a_fenced_block_runs_when_there_are_no_tool_calls(env):
    text = "Let me compute.\n```python\nprint(6 * 7)\n```\n"
    (reply,) = env.step(1, 1, [episode({"role": "assistant", "content": text})], "train")
    assert reply.messages == [{"role": "tool", "content": ANSWER}] and not reply.done


def test_an_unknown_tool_or_bad_arguments_are_told_and_the_episode_goes_on(env):
    bad_json = {
        "id": "call_3",
        "type": "function",
        "function": {"name": "python", "arguments": "{"},
    }
    message = calling(
        tool_call("print(1)", "call_1", name="shell"),
        tool_call("print(6 * 7)", "call_2"),
        bad_json,
    )
    (reply,) = env.step(1, 1, [episode(message)], "train")
    unknown, ran, malformed = reply.messages
    assert unknown["tool_call_id"] == "call_1" and "unknown tool 'shell'" in unknown["content"]
    assert ran == {"role": "tool", "content": ANSWER, "tool_call_id": "call_2"}
    assert malformed["tool_call_id"] == "call_3" and "not JSON" in malformed["content"]
    assert not reply.done


def test_the_episodes_calls_run_at_once(env):
    """Four episodes of a one-second call each take about a second, not four."""
    episodes = [
        episode(calling(tool_call("import time\ntime.sleep(1)\nprint(1)")), n) for n in range(4)
    ]
    started = time.monotonic()
    replies = env.step(1, 1, episodes, "train")
    assert time.monotonic() - started < 3
    assert [r.messages[0]["content"] for r in replies] == ["1\n[exit 0]"] * 4


def test_a_run_with_the_python_tool_plays_its_episodes(settings, tiny_model_dir):
    """The environment as a run builds it (the data directory hidden): the untrained model
    writes no call, so each episode ends after its first turn and the run's reward scores it."""
    from sqlalchemy import select

    from service.db import session_scope
    from service.models import Sample
    from workers.execute import execute_run

    from factories import submit

    rows = [{"messages": [{"role": "user", "content": "Compute 6*7."}], "answer": "42"}] * 4
    run_id = submit(
        settings,
        tiny_model_dir,
        train_rows=rows,
        environment={"type": "builtin", "name": "python_tool", "max_turns": 3},
        reward={"type": "builtin", "name": "regex", "params": {"pattern": "[a-z]"}},
        training={"steps": 2},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        episodes = session.scalars(select(Sample.episode).where(Sample.run_id == run_id)).all()
    assert episodes and all(e["end"] == "done" and len(e["turns"]) == 1 for e in episodes)


HOSTILE = {
    "network": "import socket\nsocket.create_connection(('1.1.1.1', 53), 1)",
    "write": "open('/usr/gvpo-was-here', 'w').write('x')",
    "fork bomb": FORK_BOMB,
    "endless loop": "while True:\n    pass",
    "10 GB": "data = bytearray(10 * 1024**3)",
}


def test_in_an_episode_each_refused_attempt_is_reported_and_the_episode_goes_on(
    tiny_model_dir, data_dir
):
    """The episode runner with the policy's turns scripted: each episode's first turn calls the
    tool with one hostile program, its second answers; every episode reads its refusal back,
    goes on to its second turn and ends done; the host has no trace."""
    from scripted_engine import ScriptedEngine
    from transformers import AutoTokenizer

    from service.contract.environments import BuiltinEnvironment
    from service.contract.spec import SamplingSpec
    from workers.chat import Renderer
    from workers.data import Example
    from workers.episodes import EpisodeRunner

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    codes = list(HOSTILE.values())

    def script(call: int, row: int) -> list[int]:
        text = (
            f'<tool_call>{{"name": "python", "arguments": {json.dumps({"code": codes[row]})}}}'
            "</tool_call>"
            if call == 0
            else "done"
        )
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    spec = BuiltinEnvironment(
        type="builtin", name="python_tool", max_turns=3, params=LIMITS.model_dump()
    )
    env = PythonToolEnvironment(spec.parsed_params(), data_dir=data_dir)
    runner = EpisodeRunner(
        ScriptedEngine(tok, script, tok.eos_token_id),
        Renderer(tok, [tok.eos_token_id]),
        env,
        spec,
        "run_x",
        context_tokens=10_000,
    )
    examples = [Example("", None, [{"role": "user", "content": name}]) for name in HOSTILE]
    rollouts = runner.run(1, examples, 1, SamplingSpec(max_new_tokens=400))
    said = {}
    for name, rollout in zip(HOSTILE, rollouts, strict=True):
        (episode,) = rollout.completions
        roles = [(t.message["role"], t.trained) for t in episode.turns]
        assert roles == [("assistant", True), ("tool", False), ("assistant", True)], name
        assert episode.finish_reason == "done" and episode.text == "done"
        said[name] = episode.turns[1].message["content"]
    assert "Network is unreachable" in said["network"]
    assert "Read-only file system" in said["write"] and not Path("/usr/gvpo-was-here").exists()
    # whichever limit a loaded machine reaches first
    stopped = ("[killed: time limit 2 s]", "[killed: CPU time limit 1 s]")
    assert said["fork bomb"].endswith(stopped) and said["endless loop"].endswith(stopped)
    assert "MemoryError" in said["10 GB"]
    assert still_answers(env)
