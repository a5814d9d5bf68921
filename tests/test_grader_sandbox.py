"""The `python` grader in its sandbox (workers/graders/python.py): what a grader's code cannot do
to the host (reach the network, write outside its scratch directory, fork without end, run
without end, take 10 GB, read the service's settings or database), each refused or killed, that
grading's reward 0 and an error counted, and the same grader grading a normal pair right after;
then what `sample` and `item` hold, how failures read, and a run whose python grader
misbehaves on some completions.

Needs bubblewrap (`make services` installs it).
"""

import os
import shutil
import socket
import sqlite3
import tempfile
from pathlib import Path

import pytest

from service.config import Settings
from service.contract.graders import PythonGrader
from workers.errors import RunError
from workers.graders.base import Grade, GradeError, Sample
from workers.graders.python import PythonSandboxGrader
from workers.graders.sandboxed import hidden_paths
from workers.sandbox import SandboxUnavailable

from services import process_tree

TIMEOUT_S = 1.5
SECRET = "the service's secret"
HOSTILE = """
import os
import socket


def grade(sample, item):
    attack = item.get("attack")
    if attack is None:  # a normal pair
        return 1.0 if sample.output_text == item["answer"] else 0.0
    if attack == "connect":
        socket.create_connection((item["host"], item["port"]), 1).close()
    elif attack == "write":
        with open(item["path"], "w") as f:
            f.write("x")
    elif attack == "remove":
        os.remove(item["path"])
    elif attack == "read":
        with open(item["path"], "rb") as f:
            data = f.read()
        if b"secret" not in data:
            raise LookupError(f"read {len(data)} bytes, and no secret")
    elif attack == "environment":
        return float(len(os.environ[item["name"]]))
    elif attack == "fork bomb":
        while True:
            try:
                os.fork()
            except OSError:
                pass
    elif attack == "endless loop":
        while True:
            pass
    elif attack == "10 GB":
        data = bytearray(10 * 1024**3)
        return float(len(data))
    elif attack == "exit":
        os._exit(0)
    elif attack == "swallow the time limit":
        while True:
            try:
                while True:
                    pass
            except BaseException:
                pass
    return 1.0  # it got through
"""


def spec(source: str, **fields) -> PythonGrader:
    return PythonGrader(type="python", source=source, timeout_s=TIMEOUT_S, **fields)


@pytest.fixture(scope="module")
def host_dir():
    """A directory of the host that anyone may write to, outside the places the sandbox hides
    by default when the tests can make one there (under / as root), else in the temp dir."""
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap (bwrap) is not installed: run `make services`")
    base = "/" if os.access("/", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="gvpo-grader-test-", dir=base))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def service(host_dir) -> Settings:
    """The service's settings: its data directory with a SQLite database and a secret key in
    it, readable by anyone on the host, and a .env file beside the worker."""
    data = host_dir / "data"
    data.mkdir(mode=0o777)
    data.chmod(0o777)
    with sqlite3.connect(data / "gvpo.db") as db:
        db.execute("create table secrets (value text)")
        db.execute("insert into secrets values (?)", (SECRET,))
    (data / "secret_key").write_text(SECRET)
    for path in (data / "gvpo.db", data / "secret_key"):
        path.chmod(0o666)
    (host_dir / ".env").write_text(f"GVPO_SECRET_KEY={SECRET}\n")
    (host_dir / ".env").chmod(0o666)
    return Settings(data_dir=data)


@pytest.fixture(scope="module")
def grader(service, host_dir) -> PythonSandboxGrader:
    """One grader for the module, built as a run builds it (what it hides comes from the
    settings, with the worker in host_dir), graded with throughout."""
    here = Path.cwd()
    os.chdir(host_dir)
    try:
        hidden = hidden_paths(service)
    finally:
        os.chdir(here)
    assert host_dir / ".env" in hidden
    return PythonSandboxGrader(spec(HOSTILE), hide=hidden)


NORMAL = (Sample.of("42"), {"answer": "42"})


def attack(grader: PythonSandboxGrader, item: dict) -> Grade:
    """Grade the attack between two normal pairs, in one batch: the attack is refused or
    killed (reward 0, an error), the normal pairs around it are graded right, no process of
    the sandboxes is left; then a normal pair alone, in a new batch."""
    ours = process_tree(os.getpid())
    before, hostile, after = grader.grade([NORMAL, (Sample.of("x"), item), NORMAL])
    assert process_tree(os.getpid()) == ours
    assert (before, after) == (Grade(1.0), Grade(1.0))
    assert hostile.reward == 0.0 and hostile.error is not None, hostile
    assert grader.grade([NORMAL]) == [Grade(1.0)]  # the worker is healthy
    return hostile


# -- the host is untouched -----------------------------------------------------------------


def test_a_normal_grading_gives_the_graders_reward(grader):
    wrong = (Sample.of("41"), {"answer": "42"})
    assert grader.grade([NORMAL, wrong]) == [Grade(1.0), Grade(0.0)]


def test_no_connection_reaches_a_server_on_the_hosts_loopback(grader):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        graded = attack(grader, {"attack": "connect", "host": "127.0.0.1", "port": port})
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing came
    assert graded.error is GradeError.PYTHON_RUNTIME
    assert "ConnectionRefusedError" in graded.detail or "unreachable" in graded.detail


def test_no_connection_reaches_a_public_address(grader):
    graded = attack(grader, {"attack": "connect", "host": "1.1.1.1", "port": 53})
    assert "Network is unreachable" in graded.detail


@pytest.mark.parametrize("where", ["host", "/etc", "/work", "data"])
def test_a_write_outside_the_scratch_directory_fails(grader, host_dir, service, where):
    directory = {
        "host": host_dir,
        "/etc": Path("/etc"),
        "/work": Path("/work"),
        "data": service.resolved_data_dir,
    }[where]
    path = directory / "gvpo-grader-was-here"
    graded = attack(grader, {"attack": "write", "path": str(path)})
    assert graded.error is GradeError.PYTHON_RUNTIME
    assert "Read-only file system" in graded.detail
    assert not path.exists()


def test_the_services_database_file_can_be_neither_read_nor_removed(grader, service):
    database = service.resolved_data_dir / "gvpo.db"
    read = attack(grader, {"attack": "read", "path": str(database)})
    assert "FileNotFoundError" in read.detail
    attack(grader, {"attack": "remove", "path": str(database)})
    with sqlite3.connect(database) as db:
        assert db.execute("select value from secrets").fetchone() == (SECRET,)


@pytest.mark.parametrize("name", ["secret_key", "../.env"])
def test_the_services_secret_files_cannot_be_read(grader, service, name):
    path = (service.resolved_data_dir / name).resolve()
    graded = attack(grader, {"attack": "read", "path": str(path)})
    # the data directory is an empty directory there; the .env file, a device it cannot open
    assert "FileNotFoundError" in graded.detail or "PermissionError" in graded.detail


@pytest.mark.parametrize("name", ["GVPO_SECRET_KEY", "GVPO_DATABASE_URL"])
def test_the_workers_settings_in_its_environment_are_not_passed_on(grader, monkeypatch, name):
    monkeypatch.setenv(name, SECRET)
    graded = attack(grader, {"attack": "environment", "name": name})
    assert f"KeyError: '{name}'" in graded.detail


def test_a_fork_bomb_is_stopped(grader):
    graded = attack(grader, {"attack": "fork bomb"})
    assert graded.error in (GradeError.UNRESPONSIVE, GradeError.PYTHON_RUNTIME)


def test_an_endless_loop_is_stopped_at_the_time_limit(grader):
    graded = attack(grader, {"attack": "endless loop"})
    assert graded.error is GradeError.UNRESPONSIVE
    assert graded.detail == f"grade ran past its time limit of {TIMEOUT_S:g} s"


def test_a_grader_that_swallows_the_time_limit_is_killed(grader):
    graded = attack(grader, {"attack": "swallow the time limit"})
    assert graded.error is GradeError.PYTHON_RUNTIME
    assert "ran past its time limit" in graded.detail


def test_a_10_gb_allocation_fails(grader):
    graded = attack(grader, {"attack": "10 GB"})
    assert "MemoryError" in graded.detail and "the memory limit is 1024 MB" in graded.detail


def test_a_grader_that_ends_its_interpreter_fails_only_that_grading(grader):
    graded = attack(grader, {"attack": "exit"})
    assert graded.error is GradeError.PYTHON_RUNTIME
    assert "the grading sandbox ended during this grading" in graded.detail


def test_every_attack_in_one_batch_fails_only_itself(grader, host_dir):
    items = [
        {"attack": "connect", "host": "1.1.1.1", "port": 53},
        {"attack": "write", "path": "/etc/gvpo-grader-was-here"},
        {"attack": "exit"},
        {"attack": "endless loop"},
        {"attack": "10 GB"},
    ]
    pairs = [p for item in items for p in (NORMAL, (Sample.of("x"), item))] + [NORMAL]
    grades = grader.grade(pairs)
    assert grades[0::2] == [Grade(1.0)] * (len(items) + 1)
    assert all(g.reward == 0.0 and g.error is not None for g in grades[1::2])


# -- what the code sees, and how failures read ------------------------------------------------


def grade_one(source: str, text: str = "42", item: dict | None = None, **fields) -> Grade:
    (graded,) = PythonSandboxGrader(spec(source, **fields)).grade([(Sample.of(text), item or {})])
    return graded


def test_sample_has_openais_fields_as_keys_and_attributes_and_item_is_the_row():
    source = """
def grade(sample, item):
    assert sample["output_text"] == sample.output_text == '{"n": 3}'
    assert sample.output_json == {"n": 3} and sample["output_tools"] == []
    assert isinstance(item, dict)
    return sample.output_json["n"] + item["extra"]["k"]
"""
    assert grade_one(source, '{"n": 3}', {"extra": {"k": 0.5}}) == Grade(3.5)


def test_output_json_is_none_when_the_output_is_not_json():
    source = "def grade(sample, item):\n    return sample.output_json is None\n"
    assert grade_one(source, "not JSON") == Grade(1.0)


def test_a_grader_that_raises_gets_zero_and_the_tracebacks_end():
    source = "def grade(sample, item):\n    print('looking')\n    return 1 / 0\n"
    graded = grade_one(source)
    assert (graded.reward, graded.error) == (0.0, GradeError.PYTHON_RUNTIME)
    assert 'File "grader.py", line 3, in grade' in graded.detail
    assert "return 1 / 0" in graded.detail and "ZeroDivisionError" in graded.detail
    assert "printed before: looking" in graded.detail
    assert "main.py" not in graded.detail  # the harness's own frames are left out


@pytest.mark.parametrize(
    ("returned", "needle"),
    [("'1.0'", "str '1.0', not a number"), ("None", "NoneType"), ("float('nan')", "nan")],
)
def test_a_grader_that_returns_no_finite_number_gets_zero(returned, needle):
    graded = grade_one(f"def grade(sample, item):\n    return {returned}\n")
    assert (graded.reward, graded.error) == (0.0, GradeError.PYTHON_RUNTIME)
    assert needle in graded.detail


def test_any_real_number_is_a_reward():
    assert grade_one("def grade(sample, item):\n    return True") == Grade(1.0)
    assert grade_one("def grade(sample, item):\n    return -7") == Grade(-7.0)


def test_a_source_that_fails_to_load_fails_every_grading():
    source = "import no_such_module\n\ndef grade(sample, item):\n    return 1.0\n"
    grader = PythonSandboxGrader(spec(source))
    grades = grader.grade([NORMAL, NORMAL])
    assert [g.error for g in grades] == [GradeError.PYTHON_RUNTIME] * 2
    assert "ModuleNotFoundError" in grades[0].detail


def test_a_large_batch_is_split_across_sandboxes_and_keeps_its_order():
    source = "def grade(sample, item):\n    return item['n']\n"
    grader = PythonSandboxGrader(spec(source), workers=3)
    pairs = [(Sample.of(""), {"n": n}) for n in range(100)]
    assert [g.reward for g in grader.grade(pairs)] == list(range(100))


def test_module_state_and_scratch_files_persist_within_a_batch():
    source = """
import os
seen = []

def grade(sample, item):
    seen.append(1)
    with open("count", "a") as f:
        f.write("x")
    return len(seen) * 10 + os.path.getsize("count")
"""
    grader = PythonSandboxGrader(spec(source))
    assert [g.reward for g in grader.grade([NORMAL] * 3)] == [11.0, 22.0, 33.0]


def test_a_grading_whose_sandbox_died_of_what_came_before_is_graded_again_alone():
    """Every third grading in a sandbox ends it (the grader's own state, not the pair): each
    such pair is graded again in a fresh sandbox, where it is the first, and gets its reward."""
    source = """
import os
count = 0

def grade(sample, item):
    global count
    count += 1
    if count == 3:
        os._exit(0)
    return item["n"]
"""
    grader = PythonSandboxGrader(spec(source), workers=1)
    grades = grader.grade([(Sample.of(""), {"n": n}) for n in range(8)])
    assert grades == [Grade(float(n)) for n in range(8)]


def test_the_python_kind_is_registered_and_built_from_the_runs_settings(service):
    from workers.graders.base import BUILDERS, GradingContext

    grader = BUILDERS["python"](spec(HOSTILE), GradingContext(service, "team-a"))
    assert service.resolved_data_dir in grader.hide
    assert grader.grade([NORMAL]) == [Grade(1.0)]


def test_without_a_sandbox_the_grader_is_an_infrastructure_error():
    with pytest.raises(SandboxUnavailable) as raised:
        PythonSandboxGrader(spec(HOSTILE), python="/no/such/python3")
    assert isinstance(raised.value, RunError)


# -- in a run ------------------------------------------------------------------------------


MISBEHAVING = """
def grade(sample, item):
    text = sample.output_text
    if sum(map(ord, text)) % 3 == 0:
        raise ValueError("this grader fails on a third of the completions")
    if sum(map(ord, text)) % 7 == 1:
        while True:
            pass
    return float(text[:3] == item["answer"])
"""


def test_a_run_whose_python_grader_misbehaves_on_some_completions_succeeds(
    settings, tiny_model_dir
):
    """The run's reward is a python grader that raises on some completions and loops on
    others: those are reward 0 and counted (reward/errors > 0), and the run succeeds."""
    from sqlalchemy import select

    from service.db import session_scope
    from service.models import Metric
    from workers.execute import execute_run

    from factories import submit

    reward = {"type": "python", "source": MISBEHAVING, "timeout_s": 1.0}
    run_id = submit(settings, tiny_model_dir, reward=reward, training={"steps": 2})
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        errors = session.scalars(
            select(Metric.value).where(Metric.run_id == run_id, Metric.name == "reward/errors")
        ).all()
    assert errors and sum(errors) > 0
