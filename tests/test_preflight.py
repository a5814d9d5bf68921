"""Submission-time checks of the model (service/runs/preflight.py), through the REST API on the
embedded stack: a model that cannot load, or token budgets that do not fit its context, are a
422 naming the field before anything is queued.

The tiny model's tokenizer makes one token per character and adds no special tokens, so a
prompt's length in characters is its length in tokens.
"""

import json
import os
import shutil
import tempfile

import pytest
from fastapi.testclient import TestClient

from service.contract.spec import RunSpec
from service.errors import InvalidSpec
from service.main import create_app
from service.runs.preflight import check_model, context_length

from factories import DROP, EXACT_MATCH, assert_error, auth, broker_run_ids, jsonl, run_spec, upload

CONTEXT = 64  # small_model's max_position_embeddings

# A missing folder under the embedded stack's model roots (its temp directory among them).
MISSING = f"{tempfile.gettempdir()}/no/such/model"


@pytest.fixture(scope="module")
def small_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a context of CONTEXT tokens."""
    return copy_model(
        tiny_model_dir, tmp_path_factory.mktemp("small") / "model", max_position_embeddings=CONTEXT
    )


def copy_model(source, dest, **config):
    shutil.copytree(source, dest)
    path = dest / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dest


def rows(*prompts: str) -> list[dict]:
    return [{"prompt": p, "answer": "a"} for p in prompts]


def groups(*completions: list[str], prompt: str = "abc=") -> list[dict]:
    return [{"prompt": prompt, "completions": c} for c in completions]


# How these tests change the copy task: one step, small groups, no optimizer settings.
PREFLIGHT_RUN = {
    "reward": EXACT_MATCH,
    "algorithm": {"group_size": 2, "beta": DROP},
    "sampling": {"max_new_tokens": 8},
    "optimizer": DROP,
    "training": {"steps": 1, "mini_batches": 1},
}


def body(model, train_file: str, **sections) -> dict:
    """run_spec(..., PREFLIGHT_RUN, **sections)."""
    return run_spec(model, train_file, PREFLIGHT_RUN, **sections)


def refused(api, key: str, spec: dict, *needles: str) -> list[dict]:
    """The 422's fields ([{"field", "message"}]); every needle is in the error message."""
    error = assert_error(
        api.post("/v1/runs", headers=auth(key), json=spec), 422, "invalid_request", *needles
    )
    assert all(f["message"] for f in error["details"]["fields"])
    return error["details"]["fields"]


def queued(api, key: str, spec: dict) -> dict:
    resp = api.post("/v1/runs", headers=auth(key), json=spec)
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "queued"
    return resp.json()


def test_a_model_within_every_budget_is_queued(api, make_key, settings, small_model):
    key = make_key()
    # 10 + 54 new tokens and 5 + 58 + EOS fill the context exactly: the limit is inclusive
    train = upload(api, key, rows("abc=", "0123456789"))
    evals = upload(api, key, rows("xy="))
    offpolicy = upload(api, key, groups(["a", "b" * 58], prompt="abcd="), purpose="offpolicy")
    spec = body(
        small_model,
        train,
        sampling={"max_new_tokens": 54},
        dataset={"eval_file": evals, "offpolicy_file": offpolicy},
        training={"offpolicy_fraction": 0.5},
        rollout={"max_model_len": CONTEXT},
    )
    run = queued(api, key, spec)
    assert broker_run_ids(settings) == [run["id"]]


@pytest.mark.parametrize(
    "config, needle",
    [
        (None, "has no config.json"),
        ("{not json", "is not valid JSON"),
        ('["llama"]', "is a JSON list, not an object"),
        ('{"hidden_size": 64}', "has no model_type"),
    ],
    ids=["missing", "garbage", "not_an_object", "no_model_type"],
)
def test_a_config_transformers_cannot_read_is_422_on_model_path(
    api, make_key, settings, tiny_model_dir, tmp_path, config, needle
):
    key = make_key()
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "config.json").unlink()
    if config is not None:
        (model / "config.json").write_text(config)
    fields = refused(api, key, body(model, upload(api, key, rows("abc="))), needle)
    assert [f["field"] for f in fields] == ["model.path"]
    assert str(model) in fields[0]["message"]
    assert broker_run_ids(settings) == []


def test_a_model_type_transformers_does_not_know_fails_the_run_before_its_weights_load(
    api, make_key, settings, tiny_model_dir, tmp_path
):
    """The API loads no model library, so an architecture the worker's transformers does not
    know passes submission; the worker then fails the run at once, saying why."""
    from service.db import session_scope
    from service.models import Run
    from workers.execute import execute_run

    key = make_key()
    model = copy_model(tiny_model_dir, tmp_path / "model", model_type="no_such_architecture")
    run = queued(api, key, body(model, upload(api, key, rows("abc="))))
    assert execute_run(settings, run["id"], "worker-a") == "failed"
    with session_scope(settings.resolved_database_url) as session:
        error = session.get(Run, run["id"]).error
    assert "could not load model" in error and "no_such_architecture" in error, error


def test_a_model_without_its_tokenizer_is_422_on_model_path(
    api, make_key, tiny_model_dir, tmp_path
):
    key = make_key()
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    fields = refused(
        api, key, body(model, upload(api, key, rows("abc="))), "cannot load the tokenizer"
    )
    assert [f["field"] for f in fields] == ["model.path"]


# Under the embedded stack's model roots: its temp directory, its current directory, home.
@pytest.mark.parametrize(
    "path",
    [MISSING, os.path.abspath("no-such-model"), os.path.expanduser("~/no-such-model")],
    ids=["temp", "current", "home"],
)
def test_a_local_path_missing_on_the_embedded_stack_is_422(api, make_key, settings, path):
    key = make_key()
    fields = refused(
        api,
        key,
        body(path, upload(api, key, rows("abc="))),
        "model.path",
        "no such directory",
        "share this machine",
    )
    assert [f["field"] for f in fields] == ["model.path"]
    assert broker_run_ids(settings) == []


def test_a_file_is_not_a_model_directory(api, make_key, small_model):
    key = make_key()
    fields = refused(
        api, key, body(small_model / "config.json", upload(api, key, rows("a="))), "is a file"
    )
    assert [f["field"] for f in fields] == ["model.path"]


def test_a_hub_id_is_left_to_the_worker(api, make_key, settings):
    key = make_key()
    run = queued(
        api,
        key,
        body("org/model", upload(api, key, rows("abc=")), sampling={"max_new_tokens": 100_000}),
    )
    assert broker_run_ids(settings) == [run["id"]]


def mode_api(settings, mode: str) -> TestClient:
    return TestClient(
        create_app(settings.model_copy(update={"model_path_check": mode, "reaper_interval_s": 0}))
    )


def test_strict_refuses_a_missing_local_path_and_leaves_hub_ids(settings, make_key):
    key = make_key()
    with mode_api(settings, "strict") as api:
        train = upload(api, key, rows("abc="))
        refused(api, key, body(MISSING, train), "no such directory", "strict")
        queued(api, key, body("org/model", train))


def test_off_checks_nothing(settings, make_key, tiny_model_dir, small_model, tmp_path):
    key = make_key()
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with mode_api(settings, "off") as api:
        train = upload(api, key, rows("a" * 100))
        for model in (MISSING, broken, small_model):
            queued(
                api,
                key,
                body(
                    model,
                    train,
                    sampling={"max_new_tokens": 1000},
                    rollout={"max_model_len": 100_000},
                ),
            )


def cluster(mode: str):
    """Settings of a cluster (PostgreSQL, Redis): the API may not see the workers' volume."""
    from service.config import Settings

    return Settings(
        database_url="postgresql://db/gvpo", broker_url="redis://broker/0", model_path_check=mode
    )


def test_in_a_cluster_auto_leaves_an_unseen_path_to_the_worker_and_strict_refuses_it():
    spec = RunSpec.model_validate(
        {
            "model": {"path": "/models/on-the-workers"},
            "dataset": {"train_file": "file_x"},
            "reward": {"type": "builtin", "name": "exact_match"},
        }
    )
    assert not cluster("auto").embedded
    shown = {"path": "the model"}
    check_model(cluster("auto"), None, None, spec, shown)  # no session needed: nothing is read
    with pytest.raises(InvalidSpec) as refusal:
        check_model(cluster("strict"), None, None, spec, shown)
    assert [f["field"] for f in refusal.value.details["fields"]] == ["model.path"]
    hub = spec.model_copy(update={"model": spec.model.model_copy(update={"path": "org/m"})})
    check_model(cluster("strict"), None, None, hub, shown)


def test_max_model_len_above_the_models_context_is_422(api, make_key, small_model):
    key = make_key()
    spec = body(small_model, upload(api, key, rows("abc=")), rollout={"max_model_len": 128})
    fields = refused(api, key, spec, "rollout.max_model_len")
    assert [f["field"] for f in fields] == ["rollout.max_model_len"]
    assert "128 is more than the model's context of 64 tokens" in fields[0]["message"]


def test_the_longest_train_prompt_plus_max_new_tokens_must_fit(api, make_key, small_model):
    key = make_key()
    # a blank line is a line too: the longest prompt (40 tokens) is on line 4
    content = jsonl(rows("abc=", "x" * 10)) + b"\n" + jsonl(rows("y" * 40, "z" * 39))
    train = upload(api, key, content)
    fields = refused(api, key, body(small_model, train, sampling={"max_new_tokens": 30}))
    assert [f["field"] for f in fields] == ["sampling.max_new_tokens"]
    message = fields[0]["message"]
    for needle in (
        f"line 4 of file {train} (dataset.train_file)",
        "is 40 tokens",
        "max_new_tokens 30",
        "reaches 70 tokens",
        "the model's context of 64",
        "lower sampling.max_new_tokens to at most 24",
        "shorten the prompts",
    ):
        assert needle in message, (needle, message)
    assert "raise rollout.max_model_len" not in message  # the whole context is in use already


def test_a_lower_max_model_len_is_the_limit_and_can_be_raised(api, make_key, small_model):
    key = make_key()
    train = upload(api, key, rows("x" * 10))
    fields = refused(
        api,
        key,
        body(small_model, train, sampling={"max_new_tokens": 30}, rollout={"max_model_len": 32}),
    )
    assert [f["field"] for f in fields] == ["sampling.max_new_tokens"]
    for needle in (
        "reaches 40 tokens",
        "the limit of 32 tokens (rollout.max_model_len)",
        "at most 22",
        "raise rollout.max_model_len (up to the model's context, 64)",
    ):
        assert needle in fields[0]["message"], (needle, fields[0]["message"])


def test_a_prompt_longer_than_the_limit_is_422_on_its_file(api, make_key, small_model):
    key = make_key()
    train = upload(api, key, rows("abc=", "x" * 64))
    fields = refused(api, key, body(small_model, train))
    assert [f["field"] for f in fields] == ["dataset.train_file"]
    assert f"line 2 of file {train}" in fields[0]["message"]
    assert "64 tokens, which leaves no room for a completion" in fields[0]["message"]


def test_the_eval_file_is_checked_too(api, make_key, small_model):
    key = make_key()
    train, evals = upload(api, key, rows("abc=")), upload(api, key, rows("ab=", "e" * 60))
    fields = refused(api, key, body(small_model, train, dataset={"eval_file": evals}))
    assert [f["field"] for f in fields] == ["sampling.max_new_tokens"]
    assert f"line 2 of file {evals} (dataset.eval_file)" in fields[0]["message"]
    assert "reaches 68 tokens" in fields[0]["message"]
    # the run evaluates the first eval.max_prompts rows only
    queued(
        api, key, body(small_model, train, dataset={"eval_file": evals}, eval={"max_prompts": 1})
    )


def test_an_off_policy_group_too_long_for_the_limit_is_422(api, make_key, small_model):
    key = make_key()
    train = upload(api, key, rows("abc="))
    offpolicy = upload(
        api, key, groups(["a", "b"], ["c", "d" * 60], ["e" * 10, "f"]), purpose="offpolicy"
    )
    fields = refused(
        api,
        key,
        body(
            small_model,
            train,
            dataset={"offpolicy_file": offpolicy},
            training={"offpolicy_fraction": 0.5},
        ),
    )
    assert [f["field"] for f in fields] == ["dataset.offpolicy_file"]
    message = fields[0]["message"]
    for needle in (
        f"the group on line 2 of file {offpolicy} needs 65 tokens, more than the "
        "model's context of 64",
        "a prompt of 4 and a completion of 61 with the EOS",
        "shorten that group's completions or prompt",
    ):
        assert needle in message, (needle, message)


def test_a_group_topped_up_by_the_run_needs_room_for_max_new_tokens(api, make_key, small_model):
    key = make_key()
    train = upload(api, key, rows("a="))
    offpolicy = upload(api, key, groups(["a", "b"], ["c"]), purpose="offpolicy")  # k = 2
    spec = body(
        small_model,
        train,
        dataset={"offpolicy_file": offpolicy},
        training={"offpolicy_fraction": 0.5},
    )
    queued(api, key, {**spec, "sampling": {"max_new_tokens": 60}})  # 4 + 60
    fields = refused(api, key, {**spec, "sampling": {"max_new_tokens": 61}})
    assert [f["field"] for f in fields] == ["dataset.offpolicy_file"]
    message = fields[0]["message"]
    for needle in (
        f"line 2 of file {offpolicy} needs 65 tokens",
        "1 completion the run samples to top the group up, of up to max_new_tokens (61)",
        "lower sampling.max_new_tokens to at most 60",
        "give that group all 2 completions",
    ):
        assert needle in message, (needle, message)


def test_every_problem_is_listed(api, make_key, settings, small_model):
    key = make_key()
    train, evals = upload(api, key, rows("t" * 50)), upload(api, key, rows("e" * 70))
    offpolicy = upload(api, key, groups(["a", "b" * 80]), purpose="offpolicy")
    spec = body(
        small_model,
        train,
        dataset={"eval_file": evals, "offpolicy_file": offpolicy},
        training={"offpolicy_fraction": 0.5},
        sampling={"max_new_tokens": 20},
        rollout={"max_model_len": 1000},
    )
    fields = refused(api, key, spec)
    assert [f["field"] for f in fields] == [
        "rollout.max_model_len",
        "sampling.max_new_tokens",
        "dataset.eval_file",
        "dataset.offpolicy_file",
    ]
    assert broker_run_ids(settings) == []


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"max_position_embeddings": 4096}, 4096),
        ({"n_positions": 1024}, 1024),
        ({"max_position_embeddings": 8192, "seq_length": 2048}, 2048),  # the smallest key wins
        (
            {"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4.0}},
            16384,
        ),
        (
            {
                "max_position_embeddings": 4096,
                "rope_parameters": {"rope_type": "dynamic", "factor": 2.0},
            },
            8192,
        ),
        (
            {
                "max_position_embeddings": 131072,  # yarn configs state the stretched length
                "rope_parameters": {"rope_type": "yarn", "factor": 4.0},
            },
            131072,
        ),
        ({"hidden_size": 64}, None),
    ],
)
def test_the_context_is_read_as_vllm_reads_it(config, expected):
    assert context_length(config) == expected


def test_an_adapter_to_go_on_with_must_be_one(api, make_key, small_model, tmp_path):
    key = make_key()
    train = upload(api, key, rows("abc="))

    def with_adapter(adapter) -> dict:
        spec = body(small_model, train)
        spec["model"] |= {"adapter": str(adapter), "lora": {"r": 4}}
        return spec

    missing = refused(api, key, with_adapter(tmp_path / "nope"), "no such directory")
    assert [f["field"] for f in missing] == ["model.adapter"]
    (tmp_path / "empty").mkdir()
    empty = refused(api, key, with_adapter(tmp_path / "empty"), "no adapter_config.json")
    assert [f["field"] for f in empty] == ["model.adapter"]
