"""The shape the code must keep (STYLE.md): one contract package that both sides import and
that imports neither; an API that never loads a model library; a worker that reaches into the
service only for the contract, the ORM models, the settings and the database session; no
import cycles among the worker's modules; run states spelled out in the contract alone; and a
client (client/gvpo_client, installed alone) that needs nothing but httpx.

Imports are read from the source (ast), so a lazy import inside a function counts too.
"""

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gvpo_client import TERMINAL as CLIENT_TERMINAL
from service.contract.states import TERMINAL, NotifyState, RescoreStatus, RunStatus

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "vllm", "peft", "workers")
# What the worker may import from the service side.
WORKER_MAY_IMPORT = ("service.contract", "service.models", "service.config", "service.db")
# CLI commands that run worker code in the CLI's process, importing it inside the command.
LAZY_WORKER_IMPORTS = {"service/cli/server.py", "service/demo.py"}
# The command-line programs, which import what a command needs when it runs; nothing else of the
# service imports inside a function (see test_the_service_imports_only_at_module_level).
PROGRAMS = {
    *(p.relative_to(ROOT).as_posix() for p in (ROOT / "service" / "cli").glob("*.py")),
    "service/demo.py",
    "service/stack.py",
}


# What gvpo-client depends on (client/pyproject.toml), besides the standard library.
CLIENT_MAY_IMPORT = ("gvpo_client", "httpx")


def modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), path


def imports(path: Path) -> Iterator[tuple[str, bool]]:
    """(module imported, at module level?) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:  # `from service.contract import storage` names a module
                yield f"{node.module}.{alias.name}", id(node) in top


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_contract_imports_neither_side():
    bad = [
        (rel, name)
        for rel, path in modules("service/contract")
        for name, _ in imports(path)
        if within(name, "service", "workers") and not within(name, "service.contract")
    ]
    assert bad == []


def test_the_client_imports_only_itself_httpx_and_the_standard_library():
    """gvpo-client installs without the service (its own distribution, httpx alone): an import
    of the service, the workers or the gRPC stubs would fail there."""
    bad = [
        (rel, name)
        for rel, path in modules("client/gvpo_client")
        for name, _ in imports(path)
        if not within(name, *CLIENT_MAY_IMPORT)
        and name.split(".")[0] not in sys.stdlib_module_names
    ]
    assert bad == []


def test_the_service_imports_no_worker_code():
    bad = []
    for rel, path in modules("service"):
        for name, top_level in imports(path):
            if within(name, "workers") and (top_level or rel not in LAZY_WORKER_IMPORTS):
                bad.append((rel, name))
    assert bad == []


def test_the_service_imports_only_at_module_level():
    """An import inside a function runs on the first request that reaches it, in as many
    threads as there are such requests at once: a fresh API's first concurrent submissions got
    500s from a module loaded on the request path. Everything is imported when the app is."""
    bad = [
        (rel, name)
        for rel, path in modules("service")
        if rel not in PROGRAMS
        for name, top_level in imports(path)
        if not top_level
    ]
    assert bad == []


def test_the_worker_imports_only_the_contract_models_settings_and_db_of_the_service():
    bad = [
        (rel, name)
        for rel, path in modules("workers")
        for name, _ in imports(path)
        if within(name, "service") and not within(name, *WORKER_MAY_IMPORT)
    ]
    assert bad == []


def test_the_workers_modules_import_each_other_without_a_cycle():
    graph: dict[str, set[str]] = {}
    for rel, path in modules("workers"):
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        graph[module] = {
            name for name, top_level in imports(path) if top_level and within(name, "workers")
        }
    known = set(graph)
    graph = {
        m: {next((k for k in (d, d.rsplit(".", 1)[0]) if k in known), d) for d in deps}
        for m, deps in graph.items()
    }
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, f"import cycle: {' -> '.join((*trail, module))}"
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, (*trail, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


API_PROBE = """
import json, sys, tempfile
from fastapi.testclient import TestClient
from service.config import Settings
from service.main import create_app
from service.migrate import upgrade

settings = Settings(data_dir=tempfile.mkdtemp(), grpc_port=0, reaper_interval_s=0)
upgrade(settings.resolved_database_url)
with TestClient(create_app(settings)) as api:
    answered = [api.get(path).status_code for path in ("/healthz", "/v1/run-states",
                                                       "/openapi.json", "/dashboard/")]
    # a submission: the model checks read the tiny model's config and tokenizer
    from service.auth.service import create_api_key
    from service.db import session_scope
    with session_scope(settings.resolved_database_url) as session:
        key = create_api_key(session, "probe", None)[1]
    auth = {"Authorization": f"Bearer {key}"}
    row = b'{"prompt": "a=", "answer": "a"}\\n'
    file = api.post("/v1/files", headers=auth, files={"file": ("t.jsonl", row)},
                    data={"purpose": "train"}).json()["id"]
    run = api.post("/v1/runs", headers=auth, json={
        "model": {"path": sys.argv[1]}, "dataset": {"train_file": file},
        "reward": {"type": "builtin", "name": "exact_match"}, "sampling": {"max_new_tokens": 4},
        "training": {"prompts_per_step": 1, "mini_batches": 1}})
    answered.append(run.status_code)
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2].split(",")))
print(json.dumps({"answered": answered, "heavy": heavy}))
"""


def test_the_api_process_never_loads_a_model_library(tiny_model_dir):
    """Import the app, serve health, the state table, the docs, the dashboard and a checked
    submission in a fresh interpreter: no torch, transformers, vLLM, peft or worker module is
    ever loaded."""
    out = subprocess.run(
        [sys.executable, "-c", API_PROBE, str(tiny_model_dir), ",".join(HEAVY)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe == {"answered": [200, 200, 200, 200, 201], "heavy": []}


# Names of states that other words share are judged where they stand: a string that is exactly a
# state's name, outside the contract, is a copy of it.
STATE_NAMES = {*RunStatus, *RescoreStatus, *NotifyState}


def state_literals(path: Path) -> Iterator[tuple[int, str]]:
    """String constants equal to a state's name, except dictionary keys of API answers
    (`status["pending"]`), which are other fields that happen to share the word."""
    tree = ast.parse(path.read_text())
    keys = {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in STATE_NAMES and id(node) not in keys:
            yield node.lineno, node.value


def test_the_clients_terminal_statuses_are_the_contracts():
    """The one copy of a state outside the contract: the client, installed without the
    service, keeps the statuses Client.wait stops at."""
    assert len(CLIENT_TERMINAL) == len(set(CLIENT_TERMINAL))
    assert set(CLIENT_TERMINAL) == TERMINAL


def test_state_names_appear_only_in_the_contract():
    found = [
        f"{rel}:{line}: {value!r}"
        for package in ("service", "workers")
        for rel, path in modules(package)
        if not rel.startswith("service/contract/")
        for line, value in state_literals(path)
    ]
    assert found == []


@pytest.mark.parametrize("pattern", ["service/dashboard/static/*.js", "proto/gvpo/v1/*.proto"])
def test_the_dashboard_and_the_proto_keep_no_list_of_states(pattern):
    quoted = re.compile("|".join(rf"[\"'`]{s}[\"'`]" for s in RunStatus))
    listed = re.compile(
        r"\b(" + "|".join(RunStatus) + r")\b(\s*\|\s*\b(" + "|".join(RunStatus) + r")\b)+"
    )  # "queued | running | ..."
    bad = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted(ROOT.glob(pattern))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if quoted.search(line) or listed.search(line)
    ]
    assert bad == []
