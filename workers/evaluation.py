"""Evaluation metrics: eval/pass@1, eval/pass@k and eval/reward_mean from n sampled completions
per eval prompt.

A completion passes when its reward is at least eval.pass_threshold. pass@k is the unbiased
estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code"): with c of
the n completions passing, the chance that k drawn without replacement include one is
1 - C(n-c, k) / C(n, k), computed as a product so that large n does not overflow. Averaged over
prompts; pass@1 is then the mean pass rate.
"""

import math

import torch


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) for c passing out of n (requires 1 <= k <= n)."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def eval_metrics(rewards: torch.Tensor, threshold: float, k: int) -> dict[str, float]:
    """`rewards`: (P, n), the n completions' rewards for each of P eval prompts."""
    n = rewards.shape[1]
    passing = (rewards >= threshold).sum(dim=1).tolist()  # (P,)
    return {
        "eval/pass@1": sum(pass_at_k(n, c, 1) for c in passing) / len(passing),
        "eval/pass@k": sum(pass_at_k(n, c, k) for c in passing) / len(passing),
        "eval/reward_mean": rewards.mean().item(),
    }
