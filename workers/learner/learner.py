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
- Episodes (multi-turn): a completion holds every token after the prompt, and its mask keeps
  only those the policy sampled, so s_i sums over the sampled tokens of all turns; template
  and environment tokens are context, never trained.
- A completion may come in segments, each scored given a prompt of its own (an agent's turns
  from served traffic whose contexts do not extend one another: workers/traffic.py): one
  sequence per segment, whose completion log-probs are joined back per completion, so s_i still
  sums over all of its sampled tokens, each given exactly the context it was sampled in.
- An async run's batch (training.max_lag, workers/ahead.py) was sampled by older weights than
  the learner's: the sampling policy's log-probs then come with the batch (behaviour_logps,
  computed with a copy of those weights put in the policy's place), and serve wherever the
  synchronous loop takes the weights before the step's first update (pi_ref under
  reference="sampling", GRPO's ratios).
  GVPO with reference="initial" needs none of them.
- Groups whose rewards are all equal carry no reward signal and are skipped by default.
- The step's groups are split into `mini_batches` optimizer updates. Each update runs in
  micro-batches packed with whole groups up to `micro_batch_tokens`; per-group losses are summed
  and divided by the update's group count, so the cut never changes the update.
- Several training processes (data parallel): each trains its own whole groups, so group means
  stay local; group counts and gradients are summed across them. With strategy "fsdp" the
  model is sharded (sharding.py) and FSDP reduces the gradients in the backward pass.
"""

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from service.contract.spec import AlgorithmSpec, OptimizerSpec, RunSpec
from workers.learner import sharding
from workers.learner.logprobs import build_batch, build_segment_batch, sequence_logprobs
from workers.learner.losses import LossInputs, get_loss
from workers.rollout.base import Segment, trained_parameters


@dataclass(frozen=True)
class LearnerConfig:
    """The parts of a run spec the learner uses."""

    algorithm: AlgorithmSpec
    optimizer: OptimizerSpec
    mini_batches: int  # optimizer updates per step
    micro_batch_tokens: int | None  # forward/backward budget; None = a mini-batch at once
    max_new_tokens: int  # dr_grpo's constant length normaliser (an episode's token budget)
    sharded: bool = False  # FSDP over the data-parallel ranks

    @classmethod
    def of(cls, spec: RunSpec) -> "LearnerConfig":
        return cls(
            spec.algorithm,
            spec.optimizer,
            spec.training.mini_batches,
            spec.training.micro_batch_tokens,
            spec.environment.max_episode_tokens
            if spec.environment
            else spec.sampling.max_new_tokens,
            sharded=spec.resources.strategy == "fsdp",
        )


@dataclass
class GroupBatch:
    prompt_ids: list[list[int]]  # one prompt per group
    completion_ids: list[list[list[int]]]  # (G, k, tokens)
    rewards: torch.Tensor  # (G, k)
    # (G, k, tokens): the rollout engine's log-prob of each sampled token, where it reports them
    # (None for a completion it did not sample: an off-policy group's)
    sampling_logps: list[list[list[float] | None]] | None = None
    # (G, k, tokens): 1 on the tokens the policy sampled, for episodes, whose completions hold
    # template and environment tokens too (None: every completion token is sampled)
    masks: list[list[list[int] | None]] | None = None
    # (G, k): a completion's segments, each scored given its own prompt (completion_ids and
    # masks then hold them joined); None for one that follows its group's prompt
    segments: list[list[list[Segment] | None]] | None = None
    # (G, k, tokens): each completion's token log-probs under the weights that sampled the
    # step, from behaviour_logps() (an async run's, whose batch the learner's current weights
    # did not sample; None: the weights before the step's first update sampled it)
    behaviour_logps: list[list[list[float]]] | None = None
    # or the trained parameters that sampled the step, to compute those log-probs with (for the
    # groups the learner trains only)
    sampling_weights: dict[str, torch.Tensor] | None = None
    # (G, k, tokens): pi_ref's token log-probs under reference="initial", from
    # reference_logps() (an async run's, computed on the rollout side; None: the learner's)
    reference_logps: list[list[list[float]]] | None = None

    @property
    def lagged(self) -> bool:
        """Sampled by other weights than the learner's before the step's first update."""
        return self.behaviour_logps is not None or self.sampling_weights is not None

    def pieces(self, g: int, i: int) -> list[Segment]:
        """Completion i of group g as the segments it is scored in (one, usually)."""
        if self.segments is not None and self.segments[g][i] is not None:
            return self.segments[g][i]
        mask = self.masks[g][i] if self.masks else None
        return [Segment(self.prompt_ids[g], self.completion_ids[g][i], mask)]

    def segmented(self, groups: list[int]) -> bool:
        return self.segments is not None and any(
            s is not None for g in groups for s in self.segments[g]
        )

    def group_tokens(self, g: int) -> int:
        if self.segmented([g]):
            return sum(
                len(s.prompt_ids) + len(s.token_ids)
                for i in range(len(self.completion_ids[g]))
                for s in self.pieces(g, i)
            )
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
    # max |engine log-prob - learner log-prob| over sampled tokens, under the weights that
    # sampled them (NaN when the engine reports none)
    logprob_diff_max: float
    zero_variance_frac: float
    groups_trained: int
    updates: int
    # (G, k) per completion of this process's groups, as measured before the update that
    # trained it (None: not measured, e.g. a skipped zero-variance group): summed log-ratio
    # s_i = log pi/pi_ref, and its GVPO weight w_i (None under another loss)
    logratios: list[list[float | None]] = field(default_factory=list)
    weights: list[list[float | None]] = field(default_factory=list)


@dataclass
class _Reference:
    """Token log-probs taken before the step's first update, per micro-batch (None = take the
    current policy's own, which is exact while nothing has moved yet)."""

    old: list[torch.Tensor | None]
    ref: list[torch.Tensor | None]


class _Collective:
    """Sums across data-parallel ranks (torch.distributed); the identity in a single process.

    Each rank trains on its own whole groups. Group counts are summed before the loss is
    normalised and gradients are summed after backward, so N ranks make exactly the update one
    process would make on all their groups together.
    """

    def __init__(self, device: torch.device, sharded: bool = False) -> None:
        self.device = device
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.sharded = sharded and self.active  # FSDP: gradients are reduced in backward
        # FSDP averages gradients over ranks; the loss is normalised by the global group count
        self.grad_scale = dist.get_world_size() if self.sharded else 1

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        if not self.active or self.sharded:
            return
        for p in params:
            if p.grad is None:  # this rank had no group in the update
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


class _Tally:
    """Per-step sums of the diagnostics, over micro-batches (and ranks, via `reduce`)."""

    FIELDS = ("loss", "kl", "entropy", "tokens", "s_sum", "s_sq", "s_n", "resid_sq", "spread_sq")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.FIELDS, 0.0)
        self.grad_norms: list[float] = []
        self.logprob_diff = -math.inf
        self.per_group: dict[int, tuple[list[float], list[float]]] = {}  # (s_i, w_i) by group

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.sums[key] += value

    def stats(
        self,
        collective: _Collective,
        zv: list[float],
        updates: int,
        shape: tuple[int, int],
        gvpo: bool,
    ) -> LearnStats:
        t = dict(zip(self.FIELDS, collective.sum([self.sums[f] for f in self.FIELDS]), strict=True))
        zero_var, groups, trained = collective.sum(zv)
        n, tokens = max(t["s_n"], 1.0), max(t["tokens"], 1.0)
        mean = t["s_sum"] / n
        diff = collective.max([self.logprob_diff])[0]
        var = (t["s_sq"] - n * mean**2) / (n - 1) if n > 1 else 0.0
        return LearnStats(
            loss=t["loss"] / max(updates, 1),
            grad_norm=sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else 0.0,
            kl_ref=t["kl"] / tokens,
            logratio_mean=mean,
            logratio_std=math.sqrt(max(var, 0.0)),
            entropy=t["entropy"] / tokens,
            residual_r2=1 - t["resid_sq"] / t["spread_sq"] if t["spread_sq"] > 0 else math.nan,
            logprob_diff_max=diff if diff > -math.inf else math.nan,
            zero_variance_frac=zero_var / max(groups, 1),
            groups_trained=int(trained),
            updates=updates if trained else 0,
            logratios=[self.per_group.get(g, ([None] * shape[1],))[0] for g in range(shape[0])],
            weights=[
                self.per_group[g][1] if gvpo and g in self.per_group else [None] * shape[1]
                for g in range(shape[0])
            ],
        )


class Learner:
    def __init__(
        self, model, config: LearnerConfig, device: torch.device, pad_id: int, initial_model=None
    ) -> None:
        """`initial_model`: the starting model for reference="initial" when `model` is no longer
        it (a resumed run); by default a frozen copy of `model`."""
        self.model, self.config, self.device, self.pad_id = model, config, device, pad_id
        self.objective = get_loss(config.algorithm.name)
        self.collective = _Collective(device, sharded=config.sharded)
        self.frozen = None
        if config.algorithm.reference == "initial" and not hasattr(model, "disable_adapter"):
            initial = copy.deepcopy(model) if initial_model is None else initial_model
            self.frozen = initial.eval().requires_grad_(False)
        if self.collective.sharded:  # before the optimizer: sharding replaces the parameters
            sharding.shard(model)
            if self.frozen is not None:
                sharding.shard(self.frozen)
        self.params = [p for p in model.parameters() if p.requires_grad]
        opt = config.optimizer
        # fused: one kernel over all parameters (2-3x faster optimizer steps on CPU as on GPU)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=opt.lr, weight_decay=opt.weight_decay, fused=not self.collective.sharded
        )

    def checkpoint_state(self) -> tuple[dict | None, dict]:
        """(model state dict, optimizer state dict) to save; the model's is None when the
        model can save itself. Under FSDP the full states, on rank 0: every rank calls this."""
        if self.collective.sharded:
            return sharding.full_state(self.model, self.optimizer)
        return None, self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        if self.collective.sharded:
            sharding.load_optimizer(self.model, self.optimizer, state)
        else:
            self.optimizer.load_state_dict(state)

    def lr_at(self, step: int) -> float:
        """Linear warm-up over the first warmup_steps training steps (1-based), then constant."""
        opt = self.config.optimizer
        if opt.warmup_steps and step <= opt.warmup_steps:
            return opt.lr * step / opt.warmup_steps
        return opt.lr

    def learn(self, batch: GroupBatch, step: int) -> LearnStats:
        """One training step on this process's groups (under data parallelism: this rank's)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        rewards = batch.rewards.float()  # (G, k)
        zero_var = rewards.max(dim=1).values == rewards.min(dim=1).values  # (G,)
        everything = list(range(len(batch.prompt_ids)))
        keep = everything
        if self.config.algorithm.skip_zero_variance:
            keep = (~zero_var).nonzero().flatten().tolist()
        trainable = int(self.collective.sum([float(len(keep))])[0])
        if not trainable:
            # Nothing to learn from; still measure the diagnostics so every step has them.
            keep = everything
        n_mb = min(self.config.mini_batches, trainable) if trainable else 1
        plans = [
            [mb for mb in self.micro_batches(batch, part.tolist()) if mb]
            for part in np.array_split(np.array(keep, dtype=int), n_mb)
        ]
        real = [len(plan) for plan in plans]
        if self.collective.sharded:  # every rank runs as many passes as the busiest one
            for plan, passes in zip(plans, self.collective.max(real), strict=True):
                plan.extend([[0]] * (int(passes) - len(plan)))  # fillers: any one group
        references = [
            self._reference_logps(batch, plan, first=i == 0) for i, plan in enumerate(plans)
        ]
        tally = _Tally()
        for i, (plan, reference) in enumerate(zip(plans, references, strict=True)):
            self._update(batch, plan, real[i], reference, bool(trainable), tally, first=i == 0)
        zv = [float(zero_var.sum()), float(len(everything)), float(len(keep) if trainable else 0)]
        gvpo = self.config.algorithm.name == "gvpo"
        return tally.stats(self.collective, zv, len(plans), tuple(rewards.shape), gvpo)

    def micro_batches(self, batch: GroupBatch, groups: list[int]) -> list[list[int]]:
        """Whole groups packed in order up to the token budget (a larger group goes alone)."""
        budget = self.config.micro_batch_tokens
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
        """The groups' completions as sequences, a row each; with segments a row per segment,
        mapped back to a row per completion by sequence_logprobs."""
        if batch.segmented(groups):
            pieces = [batch.pieces(g, i) for g in groups for i in range(batch.rewards.shape[1])]
            return build_segment_batch(pieces, self.pad_id, self.device)
        prompts = [batch.prompt_ids[g] for g in groups for _ in batch.completion_ids[g]]
        comps = [c for g in groups for c in batch.completion_ids[g]]
        masks = [m for g in groups for m in batch.masks[g]] if batch.masks else None
        return build_batch(prompts, comps, self.pad_id, self.device, masks)

    @contextmanager
    def _reference_model(self):
        if self.frozen is not None:
            yield self.frozen
        else:  # LoRA: the base model is the policy with its adapter switched off
            with self.model.disable_adapter():
                yield self.model

    @property
    def needs_behaviour(self) -> bool:
        """Whether the learner uses the sampling policy's log-probs (reference "sampling", or a
        ratio objective): an async run's then come from behaviour_logps()."""
        return self.objective.needs_old_logps or self.config.algorithm.reference == "sampling"

    @torch.no_grad()
    def _token_logps(self, batch: GroupBatch, plan: list[list[int]], model) -> list[torch.Tensor]:
        return [sequence_logprobs(model, self._sequences(batch, mb)).token_logps for mb in plan]

    def behaviour_logps(
        self, weights: dict[str, torch.Tensor], batch: GroupBatch
    ) -> list[list[list[float]]]:
        """(G, k, tokens): each completion's token log-probs under the policy with `weights` (a
        copy of the trained parameters that sampled the batch) in place of its own, as the
        learner computes them; for GroupBatch.behaviour_logps."""
        with self._policy_with(weights) as policy:
            return self._all_logps(batch, policy)

    @property
    def sharded(self) -> bool:
        """The policy is sharded over the ranks (FSDP)."""
        return self.collective.sharded

    def trained_copy(self) -> dict[str, torch.Tensor]:
        """A copy of the parameters the policy trains, for behaviour_logps() or a batch's
        sampling_weights later (under FSDP this process's shards)."""
        if self.collective.sharded:
            sharding.reshard(self.model)
        return trained_parameters(self.model)

    @property
    def frozen_reference(self) -> bool:
        """pi_ref is a frozen copy of the starting model (reference="initial", no LoRA), which
        another thread may run while the learner trains: see reference_logps()."""
        return self.frozen is not None and not self.collective.sharded

    def reference_logps(self, batch: GroupBatch) -> list[list[list[float]]]:
        """(G, k, tokens): pi_ref's token log-probs of every completion, from the frozen copy
        (frozen_reference), which the learner's updates never touch; for
        GroupBatch.reference_logps, computed by an async run's rollout thread."""
        return self._all_logps(batch, self.frozen)

    def _all_logps(self, batch: GroupBatch, model) -> list[list[list[float]]]:
        """(G, k, tokens): every completion's token log-probs under `model`."""
        groups = list(range(len(batch.prompt_ids)))
        plan = self.micro_batches(batch, groups)
        real = len(plan)
        if self.collective.sharded:  # every rank runs as many passes as the busiest one
            plan += [[0]] * (int(self.collective.max([real])[0]) - real)  # fillers: any group
        logps = self._token_logps(batch, plan, model)[:real]
        rows = [row for part in logps for row in part.tolist()]
        k = batch.rewards.shape[1]
        return [
            [rows[g * k + i][: len(c)] for i, c in enumerate(batch.completion_ids[g])]
            for g in groups
        ]

    @contextmanager
    def _policy_with(self, weights: dict[str, torch.Tensor]) -> Iterator:
        """The policy with `weights` in place of its own parameters of the same names, through
        torch.func.functional_call; a sharded (FSDP) model's forward gathers its own
        parameters, so there `weights` (shards) are copied into them and back, between updates
        on the learner's thread."""
        if not self.collective.sharded:
            model = self.model
            yield lambda **inputs: torch.func.functional_call(model, weights, (), inputs)
            return
        sharding.reshard(self.model)  # the shards `weights` holds
        params = dict(self.model.named_parameters())
        kept = {name: params[name].detach().clone() for name in weights}
        try:
            with torch.no_grad():
                for name, weight in weights.items():
                    params[name].copy_(weight)
            yield self.model
        finally:
            with torch.no_grad():
                for name, weight in kept.items():
                    params[name].copy_(weight)

    def _given_logps(self, given: list[list[list[float]]], mb: list[int]) -> torch.Tensor:
        """(B, C) log-probs given with the batch for the micro-batch's completions (padded to
        the longest; _update fits them to its pass's width)."""
        rows = [row for g in mb for row in given[g]]
        out = torch.zeros(len(rows), max(1, max(len(r) for r in rows)), device=self.device)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=out.dtype)
        return out

    def _reference_logps(self, batch: GroupBatch, plan: list[list[int]], first: bool) -> _Reference:
        """Everything this update needs from before the step's first update: the sampling
        policy's token log-probs (GRPO ratios, and pi_ref under reference="sampling") and the
        initial model's (reference="initial")."""
        sampling = self.config.algorithm.reference == "sampling"
        old: list[torch.Tensor | None] = [None] * len(plan)
        if batch.behaviour_logps is not None:
            old = [self._given_logps(batch.behaviour_logps, mb) for mb in plan]
        elif batch.sampling_weights is not None:
            with self._policy_with(batch.sampling_weights) as policy:
                old = self._token_logps(batch, plan, policy)
        elif (self.objective.needs_old_logps or sampling) and not first:
            old = self._token_logps(batch, plan, self.model)
        if sampling:
            return _Reference(old=old, ref=old)
        if batch.reference_logps is not None:
            return _Reference(
                old=old, ref=[self._given_logps(batch.reference_logps, mb) for mb in plan]
            )
        with self._reference_model() as reference:
            ref = self._token_logps(batch, plan, reference)
        return _Reference(old=old, ref=ref)

    def _update(
        self,
        batch: GroupBatch,
        plan: list[list[int]],
        real: int,
        reference: _Reference,
        train: bool,
        tally: _Tally,
        first: bool,
    ) -> None:
        """One optimizer update over the groups in `plan` (train=False: measure, no update);
        micro-batches from index `real` on are FSDP fillers. `first`: no update has happened
        yet this step, so the forward pass sees the weights that sampled the batch."""
        self.optimizer.zero_grad(set_to_none=True)
        k = batch.rewards.shape[1]
        n_groups = self.collective.sum([float(sum(len(mb) for mb in plan[:real]))])[0]
        algo = self.config.algorithm
        for i, (mb, old, ref) in enumerate(zip(plan, reference.old, reference.ref, strict=True)):
            with torch.set_grad_enabled(train):
                lp = sequence_logprobs(self.model, self._sequences(batch, mb), with_entropy=True)
            if i >= real:  # the pass runs FSDP's collectives and adds nothing
                if train:
                    (lp.token_logps.sum() * 0.0).backward()
                continue
            current = lp.token_logps.detach()
            # given with the batch: padded to their own longest row, not to this pass's width
            old, ref = (None if t is None else _fit(t, current.shape) for t in (old, ref))
            before_update = current if first and not batch.lagged else old
            if batch.sampling_logps is not None and before_update is not None:
                self._compare_sampling(batch, mb, before_update, lp.mask, tally)
            old = current if old is None else old
            ref = current if ref is None else ref
            shape = (len(mb), k, -1)  # (B, T) -> (g, k, T)
            inputs = LossInputs(
                policy_token_logps=lp.token_logps.view(shape),
                old_token_logps=old.view(shape),
                ref_token_logps=ref.view(shape),
                mask=lp.mask.view(shape),
                rewards=batch.rewards[mb].to(self.device),
                beta=algo.beta,
                clip_eps=algo.clip_eps,
                max_new_tokens=self.config.max_new_tokens,
            )
            loss = self.objective.per_group(inputs).sum() / n_groups
            if train:
                (loss * self.collective.grad_scale).backward()
            self._measure(inputs, lp.entropy, float(loss.detach()), tally, mb)
        if train:
            self.collective.sum_grads(self.params)
            clip = self.config.optimizer.grad_clip or math.inf
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            tally.grad_norms.append(float(sharding.full(norm)))
            self.optimizer.step()

    @torch.no_grad()
    def _compare_sampling(
        self,
        batch: GroupBatch,
        mb: list[int],
        logps: torch.Tensor,
        mask: torch.Tensor,
        tally: _Tally,
    ) -> None:
        engine = torch.zeros_like(logps)  # (B, C)
        rows = [row for g in mb for row in batch.sampling_logps[g]]
        for i, row in enumerate(rows):
            if row is None:  # nothing sampled it: nothing to compare
                engine[i] = logps[i]
            else:
                engine[i, : len(row)] = torch.tensor(row, dtype=engine.dtype)
        gap = float(((engine - logps).abs() * mask).max())
        tally.logprob_diff = max(tally.logprob_diff, gap)

    @torch.no_grad()
    def _measure(
        self, x: LossInputs, entropy: torch.Tensor, loss: float, tally: _Tally, mb: list[int]
    ) -> None:
        log_ratio = (x.ref_token_logps - x.policy_token_logps.detach()) * x.mask  # log pi_ref/pi
        s = ((x.policy_token_logps.detach() - x.ref_token_logps) * x.mask).sum(dim=-1)  # (g, k)
        r = x.rewards.float()
        implicit = x.beta * (s - s.mean(dim=1, keepdim=True))  # (g, k)
        actual = r - r.mean(dim=1, keepdim=True)  # (g, k)
        tally.add(
            loss=loss,
            kl=float(((log_ratio.exp() - 1 - log_ratio) * x.mask).sum()),  # k3
            entropy=float((entropy.view_as(x.mask) * x.mask).sum()),
            tokens=float(x.mask.sum()),
            s_sum=float(s.sum()),
            s_sq=float(s.pow(2).sum()),
            s_n=float(s.numel()),
            resid_sq=float((actual - implicit).pow(2).sum()),
            spread_sq=float(actual.pow(2).sum()),
        )
        weights = actual - implicit  # (g, k): GVPO's w_i
        for row, g in enumerate(mb):
            tally.per_group[g] = (s[row].tolist(), weights[row].tolist())


def _fit(logps: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(B, C') token log-probs cut or zero-padded to (B, C) (as they are when C' = C)."""
    width = shape[1]
    if logps.shape[1] >= width:
        return logps[:, :width]
    return torch.nn.functional.pad(logps, (0, width - logps.shape[1]))
