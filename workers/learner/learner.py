"""The GVPO learner: one call to learn() is one training step over a batch of groups.

What it computes (arXiv 2504.19599). For each prompt the batch holds k completions y_i with
rewards R_i. With s_i = log pi_theta(y_i|x) - log pi_ref(y_i|x) summed over completion tokens,
the loss per group is 1/2 * sum_i [beta*(s_i - s̄) - (R_i - R̄)]^2 / (k-1), averaged over groups;
its gradient is -beta/(G(k-1)) * sum_i w_i * grad log pi_theta(y_i|x) with
w_i = (R_i - R̄) - beta*(s_i - s̄). No importance ratio, no clipping.

- pi_ref is either the policy that sampled this step's batch (reference="sampling", the
  authors' code: log-probs taken before the first update of the step, so the KL term acts across
  the step's mini-batches) or a frozen copy of the starting model (reference="initial").
- Groups whose rewards are all equal carry no reward signal and are skipped by default.
- The step's groups are split into `mini_batches` optimizer updates; each update may run in
  micro-batches, but a group's k completions are always in the same loss computation.
"""

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from service.runs.spec import RunSpec
from workers.learner.logprobs import build_batch, sequence_logprobs
from workers.learner.losses import get_loss


@dataclass
class GroupBatch:
    prompt_ids: list[list[int]]  # one prompt per group
    completion_ids: list[list[list[int]]]  # (G, k, tokens)
    rewards: torch.Tensor  # (G, k)


@dataclass
class LearnStats:
    loss: float
    grad_norm: float
    kl_ref: float
    logratio_mean: float
    entropy: float
    zero_variance_frac: float
    groups_trained: int
    updates: int


class Learner:
    def __init__(self, model, spec: RunSpec, device: torch.device, pad_id: int) -> None:
        self.model, self.spec, self.device, self.pad_id = model, spec, device, pad_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        opt = spec.optimizer
        self.optimizer = torch.optim.AdamW(self.params, lr=opt.lr, weight_decay=opt.weight_decay)
        self.loss_fn = get_loss(spec.algorithm.name)
        self.reference = None
        if spec.algorithm.reference == "initial":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def lr_at(self, step: int) -> float:
        """Linear warm-up over the first warmup_steps training steps (1-based), then constant."""
        opt = self.spec.optimizer
        if opt.warmup_steps and step <= opt.warmup_steps:
            return opt.lr * step / opt.warmup_steps
        return opt.lr

    def learn(self, batch: GroupBatch, step: int) -> LearnStats:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rewards = batch.rewards.float()  # (G, k)
        zero_var = (rewards.max(dim=1).values == rewards.min(dim=1).values)  # (G,)
        keep = (~zero_var).nonzero().flatten().tolist()
        if not self.spec.algorithm.skip_zero_variance:
            keep = list(range(len(batch.prompt_ids)))
        zv_frac = float(zero_var.float().mean())
        train = bool(keep)
        if not train:
            # Nothing to learn from; still measure the diagnostics so every step has them.
            keep = list(range(len(batch.prompt_ids)))
        n_mb = min(self.spec.training.mini_batches, len(keep)) if train else 1
        mini_batches = [mb.tolist() for mb in np.array_split(np.array(keep), n_mb)]
        # Reference log-probs for every mini-batch before any update of this step. With the
        # sampling reference nothing has moved yet at the first mini-batch, so its reference is
        # the policy's own forward pass there (None) rather than a second pass.
        refs = [None if i == 0 and self.reference is None
                else self._token_logps(batch, mb, self.reference or self.model)
                for i, mb in enumerate(mini_batches)]
        totals = {"loss": 0.0, "grad_norm": 0.0, "kl": 0.0, "logratio": 0.0, "entropy": 0.0}
        for mb, ref in zip(mini_batches, refs, strict=True):
            out = self._update(batch, mb, ref, train)
            for key in totals:
                totals[key] += out[key] / len(mini_batches)
        return LearnStats(
            totals["loss"], totals["grad_norm"], totals["kl"], totals["logratio"],
            totals["entropy"], zv_frac, len(keep) if train else 0, len(mini_batches) if train else 0,
        )

    def _micro_batches(self, groups: list[int]) -> list[list[int]]:
        size = self.spec.training.micro_batch_groups or len(groups)
        return [groups[i : i + size] for i in range(0, len(groups), size)]

    def _sequences(self, batch: GroupBatch, groups: list[int]):
        prompts = [batch.prompt_ids[g] for g in groups for _ in batch.completion_ids[g]]
        comps = [c for g in groups for c in batch.completion_ids[g]]
        return build_batch(prompts, comps, self.pad_id, self.device)

    @torch.no_grad()
    def _token_logps(self, batch: GroupBatch, groups: list[int], model) -> list[torch.Tensor]:
        """Per-token reference log-probs (B, L-1) for each micro-batch of `groups`."""
        return [sequence_logprobs(model, self._sequences(batch, mb)).token_logps
                for mb in self._micro_batches(groups)]

    def _update(
        self, batch: GroupBatch, groups: list[int], ref: list[torch.Tensor] | None, train: bool,
    ) -> dict:
        """One optimizer update over `groups` (train=False: the same measurements, no update).

        ref: per-micro-batch reference token log-probs, or None for "the current policy's"."""
        self.optimizer.zero_grad(set_to_none=True)
        k = batch.rewards.shape[1]
        out = {"loss": 0.0, "kl": 0.0, "logratio": 0.0, "entropy": 0.0}
        micro = self._micro_batches(groups)
        for mb, ref_tok in zip(micro, ref or [None] * len(micro), strict=True):
            weight = len(mb) / len(groups)  # loss is a mean over groups: exact when split by group
            with torch.set_grad_enabled(train):
                lp = sequence_logprobs(self.model, self._sequences(batch, mb), with_entropy=True)
            if ref_tok is None:
                ref_tok = lp.token_logps.detach()
            policy = lp.summed.view(len(mb), k)  # (g, k)
            reference = (ref_tok * lp.mask).sum(dim=-1).view(len(mb), k)  # (g, k)
            rewards = batch.rewards[mb].to(self.device)  # (g, k)
            loss = self.loss_fn(policy, reference, rewards, self.spec.algorithm.beta)
            if train:
                (loss * weight).backward()
            with torch.no_grad():
                log_ratio = (ref_tok - lp.token_logps.detach()) * lp.mask  # log(pi_ref/pi) per token
                k3 = (log_ratio.exp() - 1 - log_ratio) * lp.mask  # unbiased, non-negative KL estimate
                tokens = lp.mask.sum().clamp(min=1)
                out["loss"] += float(loss) * weight
                out["kl"] += float(k3.sum() / tokens) * weight
                out["logratio"] += float((policy.detach() - reference).mean()) * weight
                out["entropy"] += float((lp.entropy * lp.mask).sum() / tokens) * weight
        out["grad_norm"] = 0.0
        if train:
            clip = self.spec.optimizer.grad_clip or math.inf
            out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
            self.optimizer.step()
        return out
