import math

import pytest
import torch

from workers.learner.losses import (
    LOSSES,
    LossInputs,
    get_loss,
    gvpo_group_losses,
    gvpo_loss,
    gvpo_weights,
    register_loss,
)

N_ACTIONS = 6
GROUP_SIZE = 4
BETA = 0.5
SEED = 0


def _random_batch(G=3, k=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(G, k, generator=g, dtype=torch.float64).requires_grad_(True)
    reference = torch.randn(G, k, generator=g, dtype=torch.float64)
    rewards = torch.rand(G, k, generator=g, dtype=torch.float64)
    return policy, reference, rewards


def _loop_loss(policy, reference, rewards, beta):
    """Direct transcription of the formula, one group and one completion at a time."""
    total = 0.0
    for p_row, r_row, rew_row in zip(
        policy.tolist(), reference.tolist(), rewards.tolist(), strict=True
    ):
        k = len(p_row)
        s = [p - r for p, r in zip(p_row, r_row, strict=True)]
        s_bar, rew_bar = sum(s) / k, sum(rew_row) / k
        residuals = [
            beta * (si - s_bar) - (ri - rew_bar) for si, ri in zip(s, rew_row, strict=True)
        ]
        total += 0.5 * sum(x**2 for x in residuals) / (k - 1)
    return total / len(policy)


# --- loss value and gradient ---------------------------------------------------------------


def test_gradient_is_scaled_negative_gvpo_weight():
    G, k, beta = 3, 5, 0.1
    policy, reference, rewards = _random_batch(G, k)
    gvpo_loss(policy, reference, rewards, beta).backward()
    expected = -(beta / (G * (k - 1))) * gvpo_weights(policy, reference, rewards, beta)
    torch.testing.assert_close(policy.grad, expected.to(policy.grad.dtype))


def test_loss_matches_hand_computed_value():
    policy = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    reference = torch.zeros(2, 3)
    rewards = torch.tensor([[0.0, 0.0, 3.0], [1.0, 2.0, 3.0]])
    # group 1 residuals [0.5, 1, -1.5] -> 3.5/2/2 = 0.875; group 2 residuals [1, 0, -1] -> 0.5
    loss = gvpo_loss(policy, reference, rewards, 0.5)
    assert loss.item() == pytest.approx(0.6875)
    assert loss.item() == pytest.approx(_loop_loss(policy, reference, rewards, 0.5))


def test_loss_matches_loop_on_random_batch():
    policy, reference, rewards = _random_batch()
    loss = gvpo_loss(policy, reference, rewards, 0.1)
    assert loss.item() == pytest.approx(_loop_loss(policy, reference, rewards, 0.1), rel=1e-5)


def test_reference_and_rewards_get_no_gradient_and_bf16_is_upcast():
    policy, reference, rewards = _random_batch()
    reference.requires_grad_(True)
    rewards.requires_grad_(True)
    loss = gvpo_loss(policy.detach().bfloat16().requires_grad_(True), reference, rewards, 0.1)
    assert loss.dtype == torch.float32
    loss.backward()
    assert reference.grad is None and rewards.grad is None


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy_shape", "reference_shape", "beta", "rewards_fill", "match"),
    [
        ((3, 1), (3, 1), 0.1, 0.0, "k must be >= 2"),
        ((3, 4), (3, 4), 0.0, 0.0, "beta must be finite and > 0"),
        ((3, 4), (3, 4), -0.1, 0.0, "beta must be finite and > 0"),
        ((3, 4), (3, 4), math.inf, 0.0, "beta must be finite and > 0"),
        ((3, 4), (3, 5), 0.1, 0.0, "shape mismatch"),
        ((12,), (12,), 0.1, 0.0, "expected 2-D"),
        ((3, 4), (3, 4), 0.1, math.nan, "rewards contains non-finite"),
    ],
    ids=["k=1", "beta=0", "beta<0", "beta=inf", "mismatched-shapes", "1-D", "nan-rewards"],
)
def test_invalid_inputs_raise(policy_shape, reference_shape, beta, rewards_fill, match):
    policy = torch.zeros(policy_shape, requires_grad=True)
    reference = torch.zeros(reference_shape)
    rewards = torch.full(reference_shape, rewards_fill)
    with pytest.raises(ValueError, match=match):
        gvpo_loss(policy, reference, rewards, beta)
    with pytest.raises(ValueError, match=match):
        gvpo_weights(policy, reference, rewards, beta)


# --- registry ------------------------------------------------------------------------------


def test_registry_holds_gvpo_and_the_baselines():
    assert set(LOSSES) == {"gvpo", "grpo", "dr_grpo"}
    assert get_loss("gvpo").per_group is gvpo_group_losses
    assert not get_loss("gvpo").needs_old_logps and get_loss("grpo").needs_old_logps


def test_unknown_loss_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown algorithm 'nope'; known: dr_grpo, grpo, gvpo"):
        get_loss("nope")


def test_duplicate_registration_raises_and_keeps_original():
    original = LOSSES["gvpo"]
    with pytest.raises(ValueError, match="already registered"):
        register_loss("gvpo")(lambda inputs: torch.zeros(()))
    assert LOSSES["gvpo"] is original


# --- the GRPO baselines on a hand-computed batch ----------------------------------------------


def _baseline_inputs(beta: float):
    """One group, k=2. Completion 0: two tokens, ratio 1. Completion 1: one real token whose
    ratio to the sampling policy is 1.5 (clipped at 1.2 for a positive advantage only), plus a
    masked position; its reference log-prob is ln 2 above the policy's."""
    policy = torch.tensor([[[-1.0, -2.0], [-0.5, -9.0]]], requires_grad=True)  # (1, 2, 2)
    old = torch.tensor([[[-1.0, -2.0], [-0.5 - math.log(1.5), -9.0]]])
    ref = torch.tensor([[[-1.0, -2.0], [-0.5 + math.log(2.0), -9.0]]])
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    return LossInputs(
        policy_token_logps=policy,
        old_token_logps=old,
        ref_token_logps=ref,
        mask=mask,
        rewards=torch.tensor([[1.0, 0.0]]),
        beta=beta,
        clip_eps=0.2,
        max_new_tokens=4,
    )


K3_LN2 = 2.0 - math.log(2.0) - 1.0  # k3 KL at log(pi_ref/pi) = ln 2


def test_grpo_hand_computed():
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # std-normalised advantages are +a and -a
    # completion 0: ratio 1, token losses -a, mean over its 2 tokens = -a
    # completion 1: advantage -a, ratio 1.5: -min(1.5*(-a), 1.2*(-a)) = 1.5a (not clipped)
    expected = (-a + 1.5 * a) / 2
    got = get_loss("grpo").per_group(_baseline_inputs(beta=0.0))
    torch.testing.assert_close(got, torch.tensor([expected]))
    with_kl = (-a + 1.5 * a + 0.1 * K3_LN2) / 2
    got = get_loss("grpo").per_group(_baseline_inputs(beta=0.1))
    torch.testing.assert_close(got, torch.tensor([with_kl]))


def test_dr_grpo_hand_computed():
    # advantages ±0.5 (no std); token sums divided by max_new_tokens = 4
    # completion 0: 2 tokens * -0.5 = -1.0 -> -0.25;
    # completion 1: -min(-0.75, -0.6) = 0.75 -> 0.1875
    got = get_loss("dr_grpo").per_group(_baseline_inputs(beta=0.0))
    torch.testing.assert_close(got, torch.tensor([(-0.25 + 0.1875) / 2]))


def test_grpo_clips_a_positive_advantage():
    x = _baseline_inputs(beta=0.0)
    x.rewards = torch.tensor([[0.0, 1.0]])  # completion 1 now has advantage +a at ratio 1.5
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    # completion 0: ratio 1, advantage -a -> +a per token; completion 1: -min(1.5a, 1.2a) = -1.2a
    torch.testing.assert_close(get_loss("grpo").per_group(x), torch.tensor([(a - 1.2 * a) / 2]))
    get_loss("grpo").per_group(x).sum().backward()
    assert x.policy_token_logps.grad[0, 1, 0] == 0  # clipped: no gradient through the ratio


def test_gvpo_objective_matches_gvpo_loss():
    x = _baseline_inputs(beta=0.1)
    policy = (x.policy_token_logps * x.mask).sum(-1)
    reference = (x.ref_token_logps * x.mask).sum(-1)
    torch.testing.assert_close(
        get_loss("gvpo").per_group(x).mean(), gvpo_loss(policy, reference, x.rewards, 0.1)
    )


# --- convergence to pi* ∝ pi_ref * exp(R / beta) on a tabular softmax policy ---------------


def _tabular_problem(seed=SEED):
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(N_ACTIONS, generator=g)
    reference_logp = torch.log_softmax(torch.randn(N_ACTIONS, generator=g), dim=0)
    rewards = torch.rand(N_ACTIONS, generator=g)
    return theta0, reference_logp, rewards, g


def _optimal_policy(reference_logp, rewards, beta=BETA):
    return torch.softmax(reference_logp + rewards / beta, dim=0)


def _tv(p, q):
    return 0.5 * (p - q).abs().sum().item()


def _train(theta0, reference_logp, rewards, generator, sampler, steps=600, groups=32, lr=0.05):
    """Minimise GVPO on groups of sampled actions; returns the final policy probabilities."""
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    # Linear decay removes the residual SGD noise so the final iterate sits on the optimum.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    uniform = torch.full((N_ACTIONS,), 1.0 / N_ACTIONS)
    for _ in range(steps):
        probs = torch.softmax(theta.detach(), dim=0) if sampler == "on_policy" else uniform
        actions = torch.multinomial(  # (groups, k) action indices
            probs.expand(groups, N_ACTIONS), GROUP_SIZE, replacement=True, generator=generator
        )
        policy_logps = torch.log_softmax(theta, dim=0)[actions]
        loss = gvpo_loss(policy_logps, reference_logp[actions], rewards[actions], BETA)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return torch.softmax(theta.detach(), dim=0)


@pytest.mark.parametrize("sampler", ["on_policy", "uniform"])
def test_converges_to_kl_regularised_optimum(sampler):
    theta0, reference_logp, rewards, g = _tabular_problem()
    target = _optimal_policy(reference_logp, rewards)
    assert _tv(torch.softmax(theta0, dim=0), target) > 0.2
    learned = _train(theta0, reference_logp, rewards, g, sampler)
    assert _tv(learned, target) < 0.02


def test_wrong_rewards_do_not_reach_optimum():
    theta0, reference_logp, rewards, g = _tabular_problem()
    wrong_rewards = rewards.flip(0)
    learned = _train(theta0, reference_logp, wrong_rewards, g, "uniform", steps=200, groups=16)
    assert _tv(learned, _optimal_policy(reference_logp, rewards)) > 0.1


# --- the two reference modes: initial vs sampling ----------------------------------------------


@pytest.mark.parametrize("sampler", ["on_policy", "uniform"])
def test_initial_reference_converges_to_optimum_of_the_starting_policy(sampler):
    """reference="initial": pi_ref is the starting policy itself, so pi* ∝ pi_0 * exp(R/beta)."""
    theta0, _, rewards, g = _tabular_problem()
    start_logp = torch.log_softmax(theta0, dim=0)
    target = _optimal_policy(start_logp, rewards)
    assert _tv(torch.softmax(theta0, dim=0), target) > 0.05
    learned = _train(theta0, start_logp, rewards, g, sampler)
    assert _tv(learned, target) < 0.02


def test_sampling_reference_takes_one_kl_step_per_rollout_batch():
    """reference="sampling": each step's pi_ref is the policy that sampled it, so a step trained
    to convergence (many mini-batches) lands on pi_old * exp(R/beta); after T steps the policy is
    pi_0 * exp(T*R/beta) — mirror ascent on the reward, not a fixed KL anchor."""
    theta0, _, rewards, g = _tabular_problem()
    theta = theta0.clone()
    for _ in range(3):
        old_logp = torch.log_softmax(theta, dim=0)  # the sampling policy of this step
        learned = _train(theta, old_logp, rewards, g, "uniform", steps=300)
        theta = torch.log(learned)
    target = _optimal_policy(torch.log_softmax(theta0, dim=0), rewards, beta=BETA / 3)
    assert _tv(torch.softmax(theta0, dim=0), target) > 0.2
    assert _tv(torch.softmax(theta, dim=0), target) < 0.02
