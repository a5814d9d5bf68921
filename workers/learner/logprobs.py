"""Summed completion log-probs (and token entropy) for batches of prompt+completion sequences."""

from dataclasses import dataclass

import torch


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (B, L) right-padded prompt + completion
    attention_mask: torch.Tensor  # (B, L)
    completion_mask: torch.Tensor  # (B, L) 1 on completion tokens


def build_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, device: torch.device,
) -> SequenceBatch:
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    comp = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[row, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attn[row, : len(p) + len(c)] = 1
        comp[row, len(p) : len(p) + len(c)] = 1
    return SequenceBatch(ids.to(device), attn.to(device), comp.to(device))


@dataclass
class SequenceLogProbs:
    token_logps: torch.Tensor  # (B, L-1) log-prob of token t+1 given its prefix
    mask: torch.Tensor  # (B, L-1) float, 1 where token t+1 is a completion token
    entropy: torch.Tensor | None  # (B, L-1) per-position entropy, detached

    @property
    def summed(self) -> torch.Tensor:
        return (self.token_logps * self.mask).sum(dim=-1)  # (B,)


def sequence_logprobs(model, batch: SequenceBatch, with_entropy: bool = False) -> SequenceLogProbs:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, :-1].float()  # (B, L-1, V): position t predicts token t+1
    targets = batch.input_ids[:, 1:]
    logp_all = torch.log_softmax(logits, dim=-1)
    token_logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, L-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(dim=-1)  # (B, L-1)
    return SequenceLogProbs(token_logps, batch.completion_mask[:, 1:].float(), entropy)
