"""Rollouts on inference workers (rollout.engine "inference"): the run's worker trains, and an
inference worker (`gvpo serve`, on this machine or another) samples, so that on a cluster
generation and training use different machines; with training.max_lag both go on at once.

- Weights: each version the run samples with is written as a model folder (publish.py's
  write_weights: LoRA merged, checkpoint names) under the run's folder, which the inference
  worker must reach (the shared data dir or object store, as checkpoints). The worker is asked
  to serve it (EnsureModel, by the rules the judge and the API use: workers/serving/ask.py)
  under the run's own name `rollout-<run id>`, which no API request can name; a newer version
  is reloaded in place by its vLLM server (/collective_rpc reload_weights). Versions are
  milliseconds since the epoch, so that a run resumed after a crash serves its weights as
  newer than any the worker still holds from before.
- Sampling: one /v1/completions request to that vLLM server (vLLM's own OpenAI server) per
  call, every prompt as token ids with n completions each, asking for the sampled tokens' ids
  (return_token_ids) and log-probs, the run's EOS ids as stop tokens, and a seed drawn from
  the run's random stream, so that a resumed run samples as the uninterrupted one did. The
  log-probs let the learner check the server's weights against its own (rollout/
  logprob_diff_max), as with vLLM in the worker.
"""

import contextlib
import shutil
import time
from pathlib import Path

import httpx
import torch

from service.config import Settings
from service.contract.serving import EnsureModel, Held
from service.contract.spec import RunSpec, SamplingSpec
from workers.errors import RunError
from workers.publish import write_weights
from workers.rollout.base import Prompt, Rollout, prompt_ids
from workers.rollout.text import CompletionBuilder, eos_token_ids
from workers.rollout.vllm import policy_weights
from workers.serving.ask import ensure_served, holders

CONNECT_S = 10.0
KEEP = 2  # weight folders kept: the one served and the one being loaded


class InferenceRolloutEngine:
    name = "inference"

    def __init__(self, settings: Settings, run_id: str, spec: RunSpec, model, tokenizer) -> None:
        """`model`: the policy (its config, generation config and the names its weights go
        by); `tokenizer`: the run's, saved with each version's weights."""
        self.settings, self.spec, self.model, self.tokenizer = settings, spec, model, tokenizer
        self.served_as = f"rollout-{run_id}"
        self.folder = settings.runs_dir / run_id / "rollout-weights"
        self.eos_ids = eos_token_ids(model.generation_config.eos_token_id, tokenizer)
        self.builder = CompletionBuilder(tokenizer, self.eos_ids)
        self.client = httpx.Client(
            headers={"Authorization": f"Bearer {settings.serve_token}"},
            timeout=httpx.Timeout(None, connect=CONNECT_S),  # the step watchdog bounds a call
        )
        self.version = 0  # of the weights served, in milliseconds since the epoch (see _next)
        self.server: str | None = None
        self.load_snapshot(self.snapshot(model))  # the starting weights, as the run has them

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingSpec) -> list[Rollout]:
        ids_of = [prompt_ids(self.tokenizer, p) for p in prompts]
        body = {
            "model": self.served_as,
            "prompt": ids_of,
            "n": n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "stop": sampling.stop or None,
            "stop_token_ids": self.eos_ids,
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": False,
            "seed": int(torch.randint(0, 2**31 - 1, ())),
        }
        answer = self._post("/v1/completions", body)
        choices = sorted(answer["choices"], key=lambda c: c["index"])  # prompt by prompt, n each
        if len(choices) != len(prompts) * n:
            raise RunError(
                f"the inference worker's vLLM server answered {len(choices)} completions for "
                f"{len(prompts)} prompts x {n}"
            )
        return [
            Rollout(
                prompt_ids=ids,
                completions=[
                    self.builder.build(c["token_ids"], sampling, c["logprobs"]["token_logprobs"])
                    for c in choices[i * n : (i + 1) * n]
                ],
            )
            for i, ids in enumerate(ids_of)
        ]

    def load_weights(self, model) -> None:
        self.load_snapshot(self.snapshot(model))

    def snapshot(self, model) -> list[tuple[str, torch.Tensor]]:
        """A copy of `model`'s weights as the folder holds them (LoRA merged)."""
        return [(name, tensor.clone()) for name, tensor in policy_weights(model)]

    def load_snapshot(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Write the weights as the next version's folder and have an inference worker serve
        it (loading or reloading); the older folders go once it does."""
        self.version = max(self.version + 1, int(time.time() * 1000))
        target = self.folder / f"v{self.version}"
        target.mkdir(parents=True)
        write_weights(target, weights, self.model, self.tokenizer, self.spec.model.chat_template)
        self.server = self._ensure(target)
        for old in sorted(self.folder.iterdir())[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)

    def offload(self) -> None:
        """Nothing held here: the inference worker holds the model."""

    def close(self) -> None:
        """Have the inference worker let the model go, and remove its folders."""
        if self.server is not None:
            for worker in holders(self.settings, self.served_as):
                with contextlib.suppress(httpx.TransportError):  # gone: it holds nothing
                    self.client.delete(f"{worker}/models/{self.served_as}")
        self.client.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _ensure(self, path: Path) -> str:
        wanted = EnsureModel(model=self.served_as, path=str(path), version=self.version)
        timeout = httpx.Timeout(self.settings.serve_load_timeout_s, connect=CONNECT_S)
        outcome = ensure_served(self.client, self.settings, wanted, timeout)
        if not isinstance(outcome, Held):
            raise RunError(f"rollout.engine 'inference': {outcome.message}")
        return outcome.url

    def _post(self, route: str, body: dict) -> dict:
        try:
            response = self.client.post(f"{self.server}{route}", json=body)
        except httpx.TransportError as exc:
            raise RunError(
                f"rollout.engine 'inference': the vLLM server at {self.server} did not answer "
                f"({exc!r})"
            ) from None
        if response.status_code != 200:
            raise RunError(
                f"rollout.engine 'inference': the vLLM server at {self.server} answered "
                f"{response.status_code}: {response.text[:500]}"
            )
        return response.json()
