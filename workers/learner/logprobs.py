"""Completion log-probs (and token entropy) for batches of prompt+completion sequences.

Prompts are left-padded and completions right-padded, so every completion starts at the same
column. The model is then asked for logits of the completion columns only (`logits_to_keep`):
with a real vocabulary the (B, L, V) logits of the prompt positions would dominate memory, and
they are never needed. Position ids follow the attention mask, as in generation.

A completion made of segments (workers/rollout/base.py Segment: pieces each scored given a
prompt of its own) takes one row per segment; the rows' completion columns are then gathered
back into one row per completion, segment after segment, so that what callers get is laid out
exactly as for single-row completions: (B, C), C the longest completion.
"""

from dataclasses import dataclass, replace

import torch

from workers.rollout.base import Segment


@dataclass
class Regroup:
    """Where each completion's token t was scored in a batch of segment rows: row
    rows[b, t], completion column cols[b, t]; mask 1 where the token carries the loss (0 on
    padding, which points at row 0, column 0)."""

    rows: torch.Tensor  # (B, C) long
    cols: torch.Tensor  # (B, C) long
    mask: torch.Tensor  # (B, C)


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (B, P + C): left-padded prompt, then right-padded completion
    attention_mask: torch.Tensor  # (B, P + C)
    position_ids: torch.Tensor  # (B, P + C) counting real tokens only
    completion_mask: torch.Tensor  # (B, C) 1 on completion tokens that carry the loss
    prompt_width: int  # P: completions start at this column
    regroup: Regroup | None = None  # segment rows -> completions (None: a row per completion)


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


def build_segment_batch(
    completions: list[list[Segment]], pad_id: int, device: torch.device
) -> SequenceBatch:
    """A row per segment, and the map from the rows back to the completions (each completion's
    segments' token ids joined in order)."""
    width = max(1, max(sum(len(s.token_ids) for s in segments) for segments in completions))
    rows = torch.zeros((len(completions), width), dtype=torch.long)  # (B, C)
    cols, mask = torch.zeros_like(rows), torch.zeros_like(rows)
    flat: list[Segment] = []
    for b, segments in enumerate(completions):
        t = 0
        for segment in segments:
            n = len(segment.token_ids)
            rows[b, t : t + n] = len(flat)
            cols[b, t : t + n] = torch.arange(n)
            mask[b, t : t + n] = torch.tensor(segment.mask) if segment.mask is not None else 1
            flat.append(segment)
            t += n
    batch = build_batch(
        [s.prompt_ids for s in flat],
        [s.token_ids for s in flat],
        pad_id,
        device,
        [s.mask for s in flat],
    )  # (R, P + C') over the R segments
    return replace(batch, regroup=Regroup(rows.to(device), cols.to(device), mask.to(device)))


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
    if (back := batch.regroup) is not None:  # segment rows (R, C') -> completions (B, C)
        token_logps = token_logps[back.rows, back.cols]
        entropy = None if entropy is None else entropy[back.rows, back.cols]
        return SequenceLogProbs(token_logps, back.mask.float(), entropy)
    return SequenceLogProbs(token_logps, batch.completion_mask.float(), entropy)
