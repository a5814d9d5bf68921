"""`gvpo demo`, the main job, as a new user runs it: the reward must rise clearly."""

import re
import subprocess
import sys

import pytest

from service.demo import DEMO_STEPS

pytestmark = pytest.mark.slow


def test_demo_learns(tmp_path):
    env_cmd = [sys.executable, "-m", "service.cli", "demo"]
    out = subprocess.run(
        env_cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            "PATH": "/usr/bin:/bin",
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "120",
            "GVPO_DATA_DIR": str(tmp_path / ".gvpo"),
        },
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    match = re.search(r"first 10% of steps ([\d.]+) -> last 10% ([\d.]+)", out.stdout)
    assert match, out.stdout[-3000:]
    first, last = map(float, match.groups())
    assert first <= 0.3 and last >= 0.7, (first, last)
    assert f"final checkpoint (step {DEMO_STEPS})" in out.stdout


def test_the_episodes_demo_submits_a_valid_run_of_chat_rows(tmp_path):
    """`gvpo demo --task episodes`: its rows are chat rows the upload accepts, and its spec a
    run of the secret_code environment the API accepts (the learning itself is
    tests/test_episode_learning.py's, with the same settings)."""
    from service.contract.spec import RunSpec
    from service.demo import TASKS
    from service.files.service import validate_jsonl

    write, make_spec, steps = TASKS["episodes"]
    rows, fields = validate_jsonl(write(tmp_path / "episodes.jsonl"))
    assert rows == 500 and fields == ["answer", "messages"]
    spec = RunSpec.model_validate(make_spec("/models/tiny", "file_x", steps))
    assert spec.environment.name == "secret_code" and spec.environment.max_turns == 2
    assert (spec.algorithm.beta, spec.optimizer.lr, spec.sampling.max_new_tokens) == (
        0.05,
        1e-3,
        4,
    )
