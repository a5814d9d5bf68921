"""Bounds at the edge: every number and string of a run spec has a limit that the database and
the hardware can hold, and a request past one, or with NUL in its text, is a 422 naming the
field, never a server error (PostgreSQL's integers are 32-bit and its text cannot hold NUL)."""

import pytest

from service.contract.limits import INT32_MAX
from service.contract.spec import RunSpec

from factories import EXACT_MATCH, assert_error, auth, copy_rows, run_spec, upload


def unbounded(node, path: str = "") -> list[str]:
    """The integers without a maximum (or one past INT32_MAX) and the free-text strings without
    a maximum length in a JSON schema."""
    found = []
    if isinstance(node, dict):
        if node.get("type") == "integer" and node.get("maximum", INT32_MAX + 1) > INT32_MAX:
            found.append(path)
        free_text = not {"enum", "const", "format"} & set(node)
        if node.get("type") == "string" and free_text and "maxLength" not in node:
            found.append(path)
        for key, value in node.items():
            found += unbounded(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += unbounded(value, f"{path}/{i}")
    return found


def test_every_integer_and_string_of_the_spec_is_bounded():
    assert unbounded(RunSpec.model_json_schema()) == []


PAST_THE_LIMITS = [
    ({"training": {"steps": 2**31}}, "training.steps"),
    ({"training": {"prompts_per_step": 10**9}}, "training.prompts_per_step"),
    ({"training": {"seed": 2**40}}, "training.seed"),
    ({"sampling": {"max_new_tokens": 2**40}}, "sampling.max_new_tokens"),
    ({"sampling": {"stop": ["x"] * 1000}}, "sampling.stop"),
    ({"checkpoint": {"keep_last": 2**33}}, "checkpoint.keep_last"),
    ({"name": "a\x00b"}, "NUL"),
    ({"sampling": {"stop": ["ok", "bad\x00"]}}, "NUL"),
    ({"dataset": {"prompt_field": "p\x00"}}, "NUL"),
    ({"model": {"path": "/models/x\x00y"}}, "NUL"),
    ({"reward": {"type": "builtin", "name": "regex", "params": {"pattern": "a\x00"}}}, "NUL"),
]


@pytest.mark.both_backends
@pytest.mark.parametrize("change, needle", PAST_THE_LIMITS)
def test_a_spec_past_a_limit_is_a_422_naming_it(api, make_key, tiny_model_dir, change, needle):
    key = make_key()
    train_file = upload(api, key, copy_rows(8))
    base = {"reward": EXACT_MATCH, "training": {"steps": 2, "prompts_per_step": 2}}
    body = run_spec(str(tiny_model_dir), train_file, base, change)
    assert_error(api.post("/v1/runs", headers=auth(key), json=body), 422, "invalid_request", needle)
    assert api.get("/v1/runs", headers=auth(key)).json()["data"] == []  # nothing stored
