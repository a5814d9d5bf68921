"""Policy-gradient losses for the learner, looked up by name from the run config.

GVPO regresses the group-centred implicit reward beta*log(pi/pi_ref) onto the
group-centred reward. Its unique minimiser is the KL-regularised optimum
pi* ∝ pi_ref * exp(R / beta) for any sampling distribution with full support, so
it needs neither importance ratios nor clipping and tolerates off-policy groups.
The GRPO baselines (grpo, dr_grpo) sit in the same registry so that users can
run both on the same data.

Every registered objective maps one micro-batch of whole groups (LossInputs) to
per-group losses (g,); the learner sums them and divides by the number of groups
in the optimizer step, so how a step is cut into micro-batches never changes the
update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.registry import Registry


@dataclass
class LossInputs:
    """One micro-batch of g whole groups of k completions, T token positions each."""

    policy_token_logps: torch.Tensor  # (g, k, T) under the policy being trained (with grad)
    old_token_logps: torch.Tensor | None  # (g, k, T) under the policy that sampled the batch
    ref_token_logps: torch.Tensor  # (g, k, T) under the reference policy
    mask: torch.Tensor  # (g, k, T) 1.0 on completion tokens
    rewards: torch.Tensor  # (g, k)
    beta: float
    clip_eps: float
    max_new_tokens: int


@dataclass(frozen=True)
class Objective:
    per_group: Callable[[LossInputs], torch.Tensor]  # LossInputs -> (g,)
    needs_old_logps: bool  # importance ratios against the sampling policy (GRPO-style)


LOSSES: Registry[Objective] = Registry("algorithm")
get_loss = LOSSES.lookup


def register_loss(name: str, needs_old_logps: bool = False):
    """Decorator: register a per-group objective under `name`."""

    def wrap(fn: Callable[[LossInputs], torch.Tensor]):
        LOSSES.register(name)(Objective(fn, needs_old_logps))
        return fn

    return wrap


def _weights(policy_logps, reference_logps, rewards, beta: float) -> torch.Tensor:
    """Validated GVPO weights w = (R - R̄) - beta*(s - s̄), still attached to policy_logps."""
    shapes = {t.shape for t in (policy_logps, reference_logps, rewards)}
    if len(shapes) != 1:
        raise ValueError(
            "shape mismatch: policy_logps, reference_logps and rewards must have equal shapes, got "
            f"{tuple(policy_logps.shape)}, {tuple(reference_logps.shape)}, {tuple(rewards.shape)}"
        )
    if policy_logps.dim() != 2:
        raise ValueError(f"expected 2-D (G, k) tensors, got shape {tuple(policy_logps.shape)}")
    if policy_logps.shape[1] < 2:
        k = policy_logps.shape[1]
        raise ValueError(f"group size k must be >= 2 (variance needs two completions), got k={k}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be finite and > 0, got {beta}")
    named = {"policy_logps": policy_logps, "reference_logps": reference_logps, "rewards": rewards}
    for name, t in named.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")

    # float32 so bf16 log-probs of long completions keep their small differences.
    s = policy_logps.float() - reference_logps.detach().float()  # (G, k)
    r = rewards.detach().float()  # (G, k)
    return (r - r.mean(dim=1, keepdim=True)) - beta * (s - s.mean(dim=1, keepdim=True))  # (G, k)


def gvpo_weights(policy_logps, reference_logps, rewards, beta: float) -> torch.Tensor:
    """Detached per-completion GVPO weights w (G, k), for logging."""
    return _weights(policy_logps, reference_logps, rewards, beta).detach()


def gvpo_loss(policy_logps, reference_logps, rewards, beta: float) -> torch.Tensor:
    """GVPO loss (arXiv 2504.19599).

    All inputs have shape (G, k): G groups of k completions of one prompt each.
    policy_logps are summed completion log-probs under the policy (with grad),
    reference_logps the same under the reference, rewards scalar rewards; the
    latter two are detached. With s = policy_logps - reference_logps, returns

        loss = mean_g  1/2 * sum_i [beta*(s_i - mean_j s_j) - (R_i - mean_j R_j)]^2 / (k - 1)

    as a float32 scalar. Consequently
    dL/d policy_logps[g,i] = -(beta / (G*(k-1))) * w[g,i] with the paper's weights
    w_i = (R_i - R̄) - beta*(s_i - s̄) (centring terms cancel because residuals sum to zero).
    """
    return _gvpo_per_group(_weights(policy_logps, reference_logps, rewards, beta)).mean()


def _gvpo_per_group(w: torch.Tensor) -> torch.Tensor:
    return 0.5 * w.pow(2).sum(dim=1) / (w.shape[1] - 1)  # (G, k) -> (G,)


@register_loss("gvpo")
def gvpo_group_losses(x: LossInputs) -> torch.Tensor:
    policy = (x.policy_token_logps * x.mask).sum(dim=-1)  # (g, k, T) -> (g, k)
    reference = (x.ref_token_logps * x.mask).sum(dim=-1)  # (g, k)
    return _gvpo_per_group(_weights(policy, reference, x.rewards, x.beta))  # (g,)


def _advantages(rewards: torch.Tensor, std_normalise: bool) -> torch.Tensor:
    r = rewards.detach().float()  # (g, k)
    adv = r - r.mean(dim=1, keepdim=True)
    if std_normalise:  # as TRL: unbiased std with a small floor
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-4)
    return adv  # (g, k)


def _clipped_token_losses(x: LossInputs, adv: torch.Tensor) -> torch.Tensor:
    """PPO-clipped surrogate per token plus beta * k3 KL to the reference, masked. (g, k, T)"""
    if x.old_token_logps is None:
        raise ValueError("the GRPO objectives need the sampling policy's token log-probs")
    policy = x.policy_token_logps.float()
    ratio = torch.exp(policy - x.old_token_logps.detach().float())  # (g, k, T)
    a = adv.unsqueeze(-1)  # (g, k, 1)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - x.clip_eps, 1 + x.clip_eps) * a)
    loss = -surrogate
    if x.beta > 0:
        log_ratio = x.ref_token_logps.detach().float() - policy
        loss = loss + x.beta * (log_ratio.exp() - log_ratio - 1)
    return loss * x.mask


@register_loss("grpo", needs_old_logps=True)
def grpo_group_losses(x: LossInputs) -> torch.Tensor:
    """GRPO: std-normalised group advantages; each completion's token losses are averaged over
    its own length, then completions are averaged."""
    tokens = _clipped_token_losses(x, _advantages(x.rewards, std_normalise=True))  # (g, k, T)
    per_completion = tokens.sum(dim=-1) / x.mask.sum(dim=-1).clamp(min=1)  # (g, k)
    return per_completion.mean(dim=1)  # (g,)


@register_loss("dr_grpo", needs_old_logps=True)
def dr_grpo_group_losses(x: LossInputs) -> torch.Tensor:
    """Dr. GRPO: no std normalisation, and token losses summed over a constant length
    (max_new_tokens) instead of each completion's own, which removes the length bias."""
    tokens = _clipped_token_losses(x, _advantages(x.rewards, std_normalise=False))  # (g, k, T)
    per_completion = tokens.sum(dim=-1) / x.max_new_tokens  # (g, k)
    return per_completion.mean(dim=1)  # (g,)
