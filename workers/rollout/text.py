"""From sampled token ids to a Completion, the same way for every engine.

Both engines hand over raw ids; cutting at EOS and at stop strings, and decoding the text the
reward sees, happen here so a reward cannot depend on which engine sampled.
"""

from service.contract.spec import SamplingSpec
from workers.rollout.base import Completion


def eos_token_ids(generation_eos, tokenizer) -> list[int]:
    """The ids that end a completion: the generation config's EOS, else the tokenizer's."""
    eos = generation_eos if generation_eos is not None else tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return [i for i in ids if i is not None]


class CompletionBuilder:
    def __init__(self, tokenizer, eos_ids: list[int]) -> None:
        self.tokenizer, self.eos_ids = tokenizer, set(eos_ids)

    def build(
        self, tokens: list[int], sampling: SamplingSpec, logprobs: list[float] | None = None
    ) -> Completion:
        ids, reason = [], "length"
        for tok in tokens:
            ids.append(tok)
            if tok in self.eos_ids:
                reason = "stop"
                break
        text = self.decode(ids)
        if any(stop in text for stop in sampling.stop):
            # Keep only the tokens up to the one that completed the stop string (generate() pads
            # such a row until the whole batch is done; vLLM already stops there).
            ids = ids[: self._stop_prefix(ids, sampling.stop)]
            text, reason = self.decode(ids), "stop"
            text = text[: min(text.index(s) for s in sampling.stop if s in text)]
        if logprobs is not None:
            logprobs = logprobs[: len(ids)]
        return Completion(text=text, token_ids=ids, finish_reason=reason, logprobs=logprobs)

    def decode(self, ids: list[int]) -> str:
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
            if any(stop in self.decode(ids[:mid]) for stop in stops):
                hi = mid
            else:
                lo = mid + 1
        return lo
