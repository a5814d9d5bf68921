"""Policy-gradient losses for the learner, looked up by name from the run config.

GVPO regresses the group-centred implicit reward beta*log(pi/pi_ref) onto the
group-centred reward. Its unique minimiser is the KL-regularised optimum
pi* ∝ pi_ref * exp(R / beta) for any sampling distribution with full support, so
it needs neither importance ratios nor clipping and tolerates off-policy groups.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from workers.registry import Registry

LossFn = Callable[..., torch.Tensor]
LOSSES: Registry[LossFn] = Registry("loss")
register_loss = LOSSES.register
get_loss = LOSSES.lookup


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


@register_loss("gvpo")
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
    w = _weights(policy_logps, reference_logps, rewards, beta)  # (G, k)
    k = w.shape[1]
    per_group = 0.5 * w.pow(2).sum(dim=1) / (k - 1)  # (G,)
    return per_group.mean()
