"""Rollouts with transformers' generate(), sharing the learner's model object.

Sharing the module means generate() always sees the learner's latest weights, so there is
nothing to sync or offload; the cost is that generation runs at training precision without
paged attention or continuous batching, which is what vLLM is for. An async run's engine
(training.max_lag, workers/ahead.py) samples with older weights than the learner's while it
trains, so it holds a copy of the model instead, loaded from snapshots of the learner's.
"""

import copy

import torch

from service.contract.spec import SamplingSpec
from workers.learner.sharding import full
from workers.rollout.base import Prompt, Rollout, prompt_ids, trained_parameters
from workers.rollout.text import CompletionBuilder, eos_token_ids

MAX_SEQUENCES_PER_BATCH = 256


class HFRolloutEngine:
    name = "hf"

    def __init__(
        self, model, tokenizer, device: torch.device, synced: bool = False, own_copy: bool = False
    ) -> None:
        """`synced`: the model is sharded (FSDP), so every rank must run the same number of
        forward passes; ranks that finish early keep stepping until all are done. `own_copy`:
        sample with a copy of `model`, loaded by load_snapshot() (an async run's), made before
        the learner shards the model: whole, so no rank waits for another's passes."""
        if own_copy:
            model = copy.deepcopy(model).eval().requires_grad_(False)
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.synced = synced and not own_copy
        self.own_copy = own_copy
        self.tokenizer.padding_side = "left"
        self.eos_ids = eos_token_ids(model.generation_config.eos_token_id, tokenizer)
        self.builder = CompletionBuilder(tokenizer, self.eos_ids)

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingSpec) -> list[Rollout]:
        per_batch = max(1, MAX_SEQUENCES_PER_BATCH // n)
        rollouts: list[Rollout] = []
        for start in range(0, len(prompts), per_batch):
            rollouts.extend(self._generate_batch(prompts[start : start + per_batch], n, sampling))
        return rollouts

    def load_weights(self, model) -> None:
        """Nothing to do when generate() runs the learner's own module."""
        if self.own_copy:
            self.load_snapshot(self.snapshot(model))

    def snapshot(self, model) -> dict[str, torch.Tensor]:
        """A copy of the weights `model` trains (a LoRA adapter's, or all), whole: the copy
        this engine samples with was made before the learner sharded the model (FSDP), so each
        shard is gathered (a collective: every rank takes its snapshot at the same step)."""
        return {name: full(weight) for name, weight in trained_parameters(model).items()}

    def load_snapshot(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights, strict=False)

    def offload(self) -> None:
        """Nothing to free: the model is the learner's."""

    def close(self) -> None:
        """Nothing to release."""

    @torch.no_grad()
    def _generate_batch(
        self, prompts: list[Prompt], n: int, sampling: SamplingSpec
    ) -> list[Rollout]:
        enc = self._left_padded([prompt_ids(self.tokenizer, p) for p in prompts])
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                **enc,
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                # transformers falls back to top_k=50 when the model's generation config names
                # none; the learner's policy is the full distribution (as vLLM samples it)
                top_k=0,
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=n,
                synced_gpus=self.synced,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.eos_ids,
                stop_strings=sampling.stop or None,
                tokenizer=self.tokenizer if sampling.stop else None,
            )
        finally:
            self.model.train(was_training)
        prompt_len = enc["input_ids"].shape[1]  # (B, P) -> (B*n, P + T)
        new_tokens = out[:, prompt_len:].tolist()  # (B*n, T)
        rollouts = []
        for i, prompt_row in enumerate(enc["input_ids"]):
            ids = prompt_row[enc["attention_mask"][i].bool()].tolist()
            group = [self.builder.build(new_tokens[i * n + j], sampling) for j in range(n)]
            rollouts.append(Rollout(prompt_ids=ids, completions=group))
        return rollouts

    def _left_padded(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
