"""Rollouts with transformers' generate(), sharing the learner's model object.

Sharing the module means generate() always sees the learner's latest weights; the cost is that
generation runs at training precision without paged attention, which is what vLLM is for.
"""

import torch

from service.runs.spec import SamplingSpec
from workers.rollout.base import Completion, Rollout

MAX_SEQUENCES_PER_BATCH = 256


class HFRolloutEngine:
    def __init__(self, model, tokenizer, device: torch.device) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.tokenizer.padding_side = "left"
        self.eos_ids = _eos_ids(model, tokenizer)

    def generate(self, prompts: list[str], n: int, sampling: SamplingSpec) -> list[Rollout]:
        per_batch = max(1, MAX_SEQUENCES_PER_BATCH // n)
        rollouts: list[Rollout] = []
        for start in range(0, len(prompts), per_batch):
            rollouts.extend(self._generate_batch(prompts[start : start + per_batch], n, sampling))
        return rollouts

    @torch.no_grad()
    def _generate_batch(self, prompts: list[str], n: int, sampling: SamplingSpec) -> list[Rollout]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                **enc, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                max_new_tokens=sampling.max_new_tokens, num_return_sequences=n,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids,
                stop_strings=sampling.stop or None,
                tokenizer=self.tokenizer if sampling.stop else None,
            )
        finally:
            self.model.train(was_training)
        prompt_len = enc["input_ids"].shape[1]
        new_tokens = out[:, prompt_len:].tolist()  # (B*n, T)
        rollouts = []
        for i, prompt_row in enumerate(enc["input_ids"]):
            prompt_ids = prompt_row[enc["attention_mask"][i].bool()].tolist()
            group = [self._completion(new_tokens[i * n + j], sampling) for j in range(n)]
            rollouts.append(Rollout(prompt_ids=prompt_ids, completions=group))
        return rollouts

    def _completion(self, tokens: list[int], sampling: SamplingSpec) -> Completion:
        ids, reason = [], "length"
        for tok in tokens:
            ids.append(tok)
            if tok in self.eos_ids:
                reason = "stop"
                break
        text = self._decode(ids)
        if any(stop in text for stop in sampling.stop):
            # generate() pads a row that hit a stop string until the whole batch is done: keep
            # only the tokens up to the one that completed the stop string.
            ids = ids[: self._stop_prefix(ids, sampling.stop)]
            text, reason = self._decode(ids), "stop"
            text = text[: min(text.index(s) for s in sampling.stop if s in text)]
        return Completion(text=text, token_ids=ids, finish_reason=reason)

    def _decode(self, ids: list[int]) -> str:
        # Only the terminating EOS is dropped: any other special token the policy emits stays in
        # the text the reward sees, so it cannot score well by hiding tokens that decode to "".
        if ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _stop_prefix(self, ids: list[int], stops: list[str]) -> int:
        """Length of the shortest prefix whose text contains a stop string (binary search)."""
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if any(stop in self._decode(ids[:mid]) for stop in stops):
                hi = mid
            else:
                lo = mid + 1
        return lo


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return [i for i in ids if i is not None]
