"""What an episode trains on: only the tokens the policy sampled, exactly as it sampled them.

- Masking: the log-probs of prompt and environment tokens are changed at will (the model's
  logits at the positions that predict them are shifted by noise); the learner's loss and its
  gradient do not move. Shifting a sampled token's instead changes both, so the test can fail.
- No re-tokenisation: with a tokenizer where decode -> encode is not the identity ("ab" is one
  token, so the sampled ids a, b decode to text that encodes back as one id), an episode keeps
  the sampled ids, the next turn's context continues from them, and the learner's batch holds
  them.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from scripted_engine import ScriptedEngine
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.contract.environments import BuiltinEnvironment
from service.contract.spec import RunSpec, SamplingSpec
from workers.chat import Renderer
from workers.data import Example
from workers.environments.builtin import build_environment
from workers.episodes import EpisodeRunner
from workers.learner.learner import GroupBatch, Learner, LearnerConfig

from factories import DROP, run_spec

CPU = torch.device("cpu")
K = 4


class ShiftedLogits(torch.nn.Module):
    """The tiny model, with noise added to the logits that predict chosen tokens: their
    log-probs change and no other position's does (a forward pass feeds no logits back)."""

    def __init__(self, model, shifted: set[tuple[int, int]], seed: int = 0) -> None:
        super().__init__()
        self.model, self.shifted, self.seed = model, shifted, seed

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).logits  # (B, L, V): column t predicts token t + 1
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.zeros_like(logits)
        for row, target in self.shifted:
            noise[row, target - 1] = 5 * torch.randn(logits.shape[-1], generator=gen)
        return SimpleNamespace(logits=(logits + noise)[:, -logits_to_keep:])


def episode_batch(seed: int = 0) -> tuple[GroupBatch, list[list[int]]]:
    """Two groups of K episodes: sampled 3 ids, 5 environment ids, sampled 2 ids (+ ragged
    lengths); returns the batch and, per sequence, its mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(4, 90, (n,), generator=gen).tolist()  # noqa: E731
    prompts = [ids(6), ids(4)]
    completions, masks = [], []
    for g in range(2):
        group, group_masks = [], []
        for i in range(K):
            extra = (g + i) % 3
            mask = [1] * 3 + [0] * 5 + [1] * (2 + extra)
            group.append(ids(len(mask)))
            group_masks.append(mask)
        completions.append(group)
        masks.append(group_masks)
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.25], [0.0, 1.0, 0.0, 0.75]])
    return GroupBatch(prompts, completions, rewards, masks=masks), masks


def positions(batch: GroupBatch, trained: bool) -> set[tuple[int, int]]:
    """(row, column) of every prompt token (but each prompt's first: nothing predicts it) and
    every masked-out completion token, or (trained=True) of the sampled ones, in the learner's
    left-padded layout."""
    width = max(len(p) for p in batch.prompt_ids)
    out, row = set(), 0
    for g, prompt in enumerate(batch.prompt_ids):
        for mask in batch.masks[g]:
            if not trained:
                out |= {(row, width - len(prompt) + j) for j in range(1, len(prompt))}
            out |= {(row, width + j) for j, m in enumerate(mask) if m == trained}
            row += 1
    return out


def loss_and_grads(model_dir, batch: GroupBatch, shifted: set[tuple[int, int]]):
    spec = RunSpec.model_validate(
        run_spec(
            model_dir,
            "f",
            {"algorithm": DROP, "training": DROP},
            algorithm={"beta": 0.1, "reference": "initial"},
            training={"mini_batches": 1},
        )
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    wrapped = ShiftedLogits(base, shifted)
    # The reference is the unshifted model, so that only the policy's log-probs move.
    learner = Learner(
        wrapped, LearnerConfig.of(spec), CPU, 0, ShiftedLogits(copy.deepcopy(base), set())
    )
    stats = learner.learn(batch, step=1)
    return stats.loss, [p.grad.clone() for p in base.parameters()]


def test_prompt_and_environment_tokens_carry_no_loss_or_gradient(tiny_model_dir):
    batch, _ = episode_batch()
    loss, grads = loss_and_grads(tiny_model_dir, batch, set())
    assert loss > 0 and any(g.abs().sum() > 0 for g in grads)
    masked = positions(batch, trained=False)
    shifted_loss, shifted_grads = loss_and_grads(tiny_model_dir, batch, masked)
    assert shifted_loss == pytest.approx(loss, rel=1e-6, abs=1e-9)
    for a, b in zip(grads, shifted_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # The same noise on the policy's own tokens moves both: the check above can fail.
    moved_loss, moved_grads = loss_and_grads(tiny_model_dir, batch, positions(batch, trained=True))
    assert moved_loss != pytest.approx(loss, rel=1e-3)
    assert any(not torch.allclose(a, b) for a, b in zip(grads, moved_grads, strict=True))


@pytest.fixture(scope="module")
def merging_tokenizer(tiny_model_dir):
    """The tiny tokenizer with "ab" as one more token: text "ab" encodes as that one id."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["ab"])
    return tokenizer


def test_sampled_ids_are_never_retokenised(merging_tokenizer):
    tok = merging_tokenizer
    a, b = (tok.convert_tokens_to_ids(c) for c in "ab")
    eos = tok.eos_token_id
    assert tok(tok.decode([a, b]), add_special_tokens=False)["input_ids"] != [a, b]  # premise
    turns = [[a, b, eos], [a, b, b, eos]]
    engine = ScriptedEngine(tok, lambda call, row: turns[call], eos)
    renderer = Renderer(tok, [eos])
    spec = BuiltinEnvironment(type="builtin", name="secret_code", max_turns=2)
    runner = EpisodeRunner(engine, renderer, build_environment(spec, "answer"), spec, "run_x")
    example = Example("", "abc", [{"role": "user", "content": "code?"}], item={"answer": "abc"})

    [rollout] = runner.run(1, [example], K, SamplingSpec(max_new_tokens=8))

    prompt = renderer.prompt(example, as_chat=True)[1]
    between = renderer.close_turn([a, b, eos]) + renderer.observation(
        [{"role": "user", "content": "abc"}]
    )
    assert engine.contexts[0] == [prompt]  # turn 1: K episodes of one prompt
    assert engine.contexts[1] == [prompt + [a, b, eos] + between] * K  # turn 2: exact contexts
    for c in rollout.completions:
        assert c.token_ids == [a, b, eos] + between + [a, b, b, eos]
        assert c.mask == [1] * 3 + [0] * len(between) + [1] * 4
        assert c.finish_reason == "done" and c.reward == pytest.approx(2 / 3)  # "abb" vs "abc"
    batch = GroupBatch(
        [rollout.prompt_ids],
        [[c.token_ids for c in rollout.completions]],
        torch.zeros(1, K),
        masks=[[c.mask for c in rollout.completions]],
    )
    assert batch.completion_ids[0][0][:2] == [a, b]  # what the learner scores
