"""Completion log-probs (and token entropy) for batches of prompt+completion sequences.

Prompts are left-padded and completions right-padded, so every completion starts at the same
column. The model is then asked for logits of the completion columns only (`logits_to_keep`):
with a real vocabulary the (B, L, V) logits of the prompt positions would dominate memory, and
they are never needed. Position ids follow the attention mask, as in generation.
"""

from dataclasses import dataclass

import torch


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (B, P + C): left-padded prompt, then right-padded completion
    attention_mask: torch.Tensor  # (B, P + C)
    position_ids: torch.Tensor  # (B, P + C) counting real tokens only
    completion_mask: torch.Tensor  # (B, C) 1 on completion tokens that carry the loss
    prompt_width: int  # P: completions start at this column


def build_batch(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    device: torch.device,
    masks: list[list[int] | None] | None = None,
) -> SequenceBatch:
    """`masks`: per completion, 1 on the tokens that carry the loss (an episode's sampled ids;
    None or absent: every token)."""
    width_p = max(len(p) for p in prompts)
    width_c = max(len(c) for c in completions)
    ids = torch.full((len(prompts), width_p + width_c), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        start = width_p - len(p)
        ids[row, start : width_p + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attn[row, start : width_p + len(c)] = 1
    positions = (attn.cumsum(dim=1) - 1).clamp(min=0)
    comp = attn[:, width_p:].clone()
    for row, mask in enumerate(masks or []):
        if mask is not None:
            comp[row, : len(mask)] = torch.tensor(mask, dtype=comp.dtype)
    return SequenceBatch(
        ids.to(device), attn.to(device), positions.to(device), comp.to(device), width_p
    )


@dataclass
class SequenceLogProbs:
    token_logps: torch.Tensor  # (B, C) log-prob of each completion token given its prefix
    mask: torch.Tensor  # (B, C) float, 1 on real completion tokens
    entropy: torch.Tensor | None  # (B, C) per-position entropy, detached

    @property
    def summed(self) -> torch.Tensor:
        return (self.token_logps * self.mask).sum(dim=-1)  # (B,)


def sequence_logprobs(model, batch: SequenceBatch, with_entropy: bool = False) -> SequenceLogProbs:
    width_c = batch.completion_mask.shape[1]
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=width_c + 1,
    ).logits  # (B, C + 1, V): columns P-1 .. P+C-1
    logits = logits[:, :-1].float()  # (B, C, V): column P-1+t predicts completion token t
    targets = batch.input_ids[:, batch.prompt_width :]  # (B, C)
    logp_all = torch.log_softmax(logits, dim=-1)
    token_logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, C)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(dim=-1)  # (B, C)
    return SequenceLogProbs(token_logps, batch.completion_mask.float(), entropy)
