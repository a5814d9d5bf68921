"""The learner: one call to learn() is one training step over a batch of groups.

What it computes for GVPO (arXiv 2504.19599). For each prompt the batch holds k completions y_i
with rewards R_i. With s_i = log pi_theta(y_i|x) - log pi_ref(y_i|x) summed over completion
tokens, the loss per group is 1/2 * sum_i [beta*(s_i - s̄) - (R_i - R̄)]^2 / (k-1), averaged over
groups; its gradient is -beta/(G(k-1)) * sum_i w_i * grad log pi_theta(y_i|x) with
w_i = (R_i - R̄) - beta*(s_i - s̄). No importance ratio, no clipping. The GRPO baselines (grpo,
dr_grpo) come from the same loss registry and add token-level clipped ratios against the
policy that sampled the batch.

- pi_ref is either the policy that sampled this step's batch (reference="sampling", the
  authors' code: log-probs taken before the first update of the step, so the KL term acts across
  the step's mini-batches) or the starting model (reference="initial": a frozen copy, or with
  LoRA the same model with its adapter disabled).
- Groups whose rewards are all equal carry no reward signal and are skipped by default.
- The step's groups are split into `mini_batches` optimizer updates. Each update runs in
  micro-batches packed with whole groups up to `micro_batch_tokens`; per-group losses are summed
  and divided by the update's group count, so the cut never changes the update.
"""

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from service.runs.spec import RunSpec
from workers.learner.logprobs import build_batch, sequence_logprobs
from workers.learner.losses import LossInputs, get_loss


@dataclass
class GroupBatch:
    prompt_ids: list[list[int]]  # one prompt per group
    completion_ids: list[list[list[int]]]  # (G, k, tokens)
    rewards: torch.Tensor  # (G, k)

    def group_tokens(self, g: int) -> int:
        return sum(len(self.prompt_ids[g]) + len(c) for c in self.completion_ids[g])


@dataclass
class LearnStats:
    loss: float
    grad_norm: float
    kl_ref: float
    logratio_mean: float
    logratio_std: float
    entropy: float
    residual_r2: float  # GVPO fit: R² of beta*(s_i - s̄) against (R_i - R̄)
    zero_variance_frac: float
    groups_trained: int
    updates: int


@dataclass
class _Reference:
    """Token log-probs taken before the step's first update, per micro-batch (None = take the
    current policy's own, which is exact while nothing has moved yet)."""

    old: list[torch.Tensor | None]
    ref: list[torch.Tensor | None]


class _Tally:
    """Per-step sums of the diagnostics, over micro-batches."""

    def __init__(self) -> None:
        self.loss, self.kl, self.entropy, self.tokens = 0.0, 0.0, 0.0, 0.0
        self.grad_norms: list[float] = []
        self.logratios: list[torch.Tensor] = []  # (g, k) s_i
        self.fit: list[tuple[torch.Tensor, torch.Tensor]] = []  # centred beta*s, centred R

    def stats(self, zv_frac: float, groups: int, updates: int) -> LearnStats:
        s = torch.cat([x.flatten() for x in self.logratios])
        implicit = torch.cat([a.flatten() for a, _ in self.fit])
        actual = torch.cat([b.flatten() for _, b in self.fit])
        total = float(actual.pow(2).sum())
        r2 = 1 - float((actual - implicit).pow(2).sum()) / total if total > 0 else math.nan
        tokens = max(self.tokens, 1.0)
        return LearnStats(
            loss=self.loss / max(updates, 1),
            grad_norm=sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else 0.0,
            kl_ref=self.kl / tokens, logratio_mean=float(s.mean()),
            logratio_std=float(s.std()) if s.numel() > 1 else 0.0,
            entropy=self.entropy / tokens, residual_r2=r2, zero_variance_frac=zv_frac,
            groups_trained=groups, updates=updates,
        )


class Learner:
    def __init__(self, model, spec: RunSpec, device: torch.device, pad_id: int) -> None:
        self.model, self.spec, self.device, self.pad_id = model, spec, device, pad_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        opt = spec.optimizer
        self.optimizer = torch.optim.AdamW(self.params, lr=opt.lr, weight_decay=opt.weight_decay)
        self.objective = get_loss(spec.algorithm.name)
        self.frozen = None
        if spec.algorithm.reference == "initial" and not hasattr(model, "disable_adapter"):
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def lr_at(self, step: int) -> float:
        """Linear warm-up over the first warmup_steps training steps (1-based), then constant."""
        opt = self.spec.optimizer
        if opt.warmup_steps and step <= opt.warmup_steps:
            return opt.lr * step / opt.warmup_steps
        return opt.lr

    def learn(self, batch: GroupBatch, step: int) -> LearnStats:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        rewards = batch.rewards.float()  # (G, k)
        zero_var = rewards.max(dim=1).values == rewards.min(dim=1).values  # (G,)
        zv_frac = float(zero_var.float().mean())
        keep = (~zero_var).nonzero().flatten().tolist()
        if not self.spec.algorithm.skip_zero_variance:
            keep = list(range(len(batch.prompt_ids)))
        train = bool(keep)
        if not train:
            # Nothing to learn from; still measure the diagnostics so every step has them.
            keep = list(range(len(batch.prompt_ids)))
        n_mb = min(self.spec.training.mini_batches, len(keep)) if train else 1
        mini_batches = [mb.tolist() for mb in np.array_split(np.array(keep), n_mb)]
        plans = [self.micro_batches(batch, mb) for mb in mini_batches]
        references = [self._reference_logps(batch, plan, first=i == 0)
                      for i, plan in enumerate(plans)]
        tally = _Tally()
        for plan, reference in zip(plans, references, strict=True):
            self._update(batch, plan, reference, train, tally)
        return tally.stats(zv_frac, len(keep) if train else 0, len(plans) if train else 0)

    def micro_batches(self, batch: GroupBatch, groups: list[int]) -> list[list[int]]:
        """Whole groups packed in order up to the token budget (a larger group goes alone)."""
        budget = self.spec.training.micro_batch_tokens
        if budget is None:
            return [groups]
        packed, current, used = [], [], 0
        for g in groups:
            cost = batch.group_tokens(g)
            if current and used + cost > budget:
                packed.append(current)
                current, used = [], 0
            current.append(g)
            used += cost
        return packed + [current] if current else packed

    def _sequences(self, batch: GroupBatch, groups: list[int]):
        prompts = [batch.prompt_ids[g] for g in groups for _ in batch.completion_ids[g]]
        comps = [c for g in groups for c in batch.completion_ids[g]]
        return build_batch(prompts, comps, self.pad_id, self.device)

    @contextmanager
    def _reference_model(self):
        if self.frozen is not None:
            yield self.frozen
        else:  # LoRA: the base model is the policy with its adapter switched off
            with self.model.disable_adapter():
                yield self.model

    @torch.no_grad()
    def _token_logps(self, batch: GroupBatch, plan: list[list[int]], model) -> list[torch.Tensor]:
        return [sequence_logprobs(model, self._sequences(batch, mb)).token_logps for mb in plan]

    def _reference_logps(self, batch: GroupBatch, plan: list[list[int]], first: bool) -> _Reference:
        """Everything this update needs from before the step's first update: the sampling
        policy's token log-probs (GRPO ratios, and pi_ref under reference="sampling") and the
        initial model's (reference="initial")."""
        sampling = self.spec.algorithm.reference == "sampling"
        old: list[torch.Tensor | None] = [None] * len(plan)
        if (self.objective.needs_old_logps or sampling) and not first:
            old = self._token_logps(batch, plan, self.model)
        if sampling:
            return _Reference(old=old, ref=old)
        with self._reference_model() as reference:
            ref = self._token_logps(batch, plan, reference)
        return _Reference(old=old, ref=ref)

    def _update(self, batch: GroupBatch, plan: list[list[int]], reference: _Reference,
                train: bool, tally: _Tally) -> None:
        """One optimizer update over the groups in `plan` (train=False: measure, no update)."""
        self.optimizer.zero_grad(set_to_none=True)
        k = batch.rewards.shape[1]
        n_groups = sum(len(mb) for mb in plan)
        algo = self.spec.algorithm
        for mb, old, ref in zip(plan, reference.old, reference.ref, strict=True):
            with torch.set_grad_enabled(train):
                lp = sequence_logprobs(self.model, self._sequences(batch, mb), with_entropy=True)
            current = lp.token_logps.detach()
            old = current if old is None else old
            ref = current if ref is None else ref
            shape = (len(mb), k, -1)  # (B, T) -> (g, k, T)
            inputs = LossInputs(
                policy_token_logps=lp.token_logps.view(shape), old_token_logps=old.view(shape),
                ref_token_logps=ref.view(shape), mask=lp.mask.view(shape),
                rewards=batch.rewards[mb].to(self.device), beta=algo.beta,
                clip_eps=algo.clip_eps, max_new_tokens=self.spec.sampling.max_new_tokens,
            )
            loss = self.objective.per_group(inputs).sum() / n_groups
            if train:
                loss.backward()
            self._measure(inputs, lp.entropy, float(loss.detach()), tally)
        if train:
            clip = self.spec.optimizer.grad_clip or math.inf
            tally.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.params, clip)))
            self.optimizer.step()

    @torch.no_grad()
    def _measure(self, x: LossInputs, entropy: torch.Tensor, loss: float, tally: _Tally) -> None:
        log_ratio = (x.ref_token_logps - x.policy_token_logps.detach()) * x.mask  # log pi_ref/pi
        tally.kl += float(((log_ratio.exp() - 1 - log_ratio) * x.mask).sum())  # k3: unbiased
        tally.entropy += float((entropy.view_as(x.mask) * x.mask).sum())
        tally.tokens += float(x.mask.sum())
        tally.loss += loss
        s = ((x.policy_token_logps.detach() - x.ref_token_logps) * x.mask).sum(dim=-1)  # (g, k)
        r = x.rewards.float()
        tally.logratios.append(s)
        tally.fit.append((x.beta * (s - s.mean(dim=1, keepdim=True)),
                          r - r.mean(dim=1, keepdim=True)))
