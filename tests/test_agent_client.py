"""examples/agent_client.py, as a user runs it against the embedded stack (issue 21's
acceptance): an agent written with the `openai` SDK alone makes a run, plays its two-turn game
through the run's served model, posts its episodes ahead of training, and the run's reward
rises while it trains on episodes served by weights several syncs old."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.stack import stack_env

from services import cli, stack_settings, start_stack

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
AGENT_S = 900.0  # on a loaded 2-core machine
STEPS = 24


def test_the_agent_raises_its_runs_reward_from_its_own_traffic(tmp_path, tiny_model_dir):
    settings = stack_settings(tmp_path / "stack")
    cli(settings, "db", "upgrade")
    stack = start_stack(settings, settings.resolved_data_dir / "logs")
    try:
        key = cli(settings, "api-key", "create", "--project", "agent")
        out = tmp_path / "rounds.json"
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "agent_client.py"),
                "--model",
                str(tiny_model_dir),
                "--steps",
                str(STEPS),
                "--json",
                str(out),
            ],
            env={**stack_env(settings), "GVPO_API_URL": stack.url, "GVPO_API_KEY": key},
            capture_output=True,
            text=True,
            timeout=AGENT_S,
        )
    finally:
        stack.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    rewards = [r["reward"] for r in result["rounds"]]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.2 and last >= 0.7, rewards
    # the agent ran ahead of training: steps trained on episodes several syncs old
    assert max(result["staleness_max"]) >= 2, result["staleness_max"]
    assert "reward: first rounds" in done.stdout
