"""Multi-turn episodes (DESIGN.md §v2.1): k episodes per prompt, played turn by turn against
the run's environment, and handed to the learner as one completion each.

An episode's completion is every token after its prompt: the ids the policy sampled in each
turn, exactly as sampled, and between turns the template's end-of-turn tokens and the rendered
environment messages with the next generation prompt (workers/chat.py). Its mask marks the
sampled ids, so s_i sums log(pi_theta/pi_ref) over the policy's tokens of every turn and no
other. Turn 1 samples k episodes per prompt at once; later turns continue each live episode
from its exact context (an extension of its last one, so vLLM's prefix cache reuses it).

After each assistant turn the environment answers every live episode at once. An episode ends
when the environment says done (with or without a reward), or truncated when it reaches
`max_turns` assistant turns or has no room left for another turn, in `max_episode_tokens` or in
the model's context.
"""

import time
from dataclasses import dataclass, field

from service.contract.environments import EnvironmentSpec
from service.contract.events import EventType
from service.contract.spec import RunSpec, SamplingSpec
from workers.chat import Renderer, assistant_message
from workers.data import Example
from workers.environments.base import Environment, EpisodeView, Reply
from workers.environments.builtin import build_environment
from workers.rewards.webhook import WebhookContext, batch_name
from workers.rollout.base import Completion, Rollout, RolloutEngine, Turn

DONE, MAX_TURNS, MAX_TOKENS = "done", "max_turns", "max_episode_tokens"
TRUNCATED = (MAX_TURNS, MAX_TOKENS)


@dataclass
class _Episode:
    view: EpisodeView  # ids, item, and the conversation so far (prompt messages first)
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # after the prompt
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] | None = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    assistant_turns: int = 0
    text: str = ""  # the last assistant turn's content
    end: str | None = None
    reward: float | None = None

    def completion(self) -> Completion:
        return Completion(
            text=self.text,
            token_ids=self.tokens,
            finish_reason=self.end,
            logprobs=self.logprobs,
            mask=self.mask,
            turns=self.turns,
            reward=self.reward,
        )


class EpisodeRunner:
    def __init__(
        self,
        engine: RolloutEngine,
        renderer: Renderer,
        environment: Environment,
        spec: EnvironmentSpec,
        run_id: str,
        context_tokens: int | None = None,
    ) -> None:
        """`context_tokens`: the model's context length (prompt and episode together)."""
        self.engine, self.renderer, self.environment = engine, renderer, environment
        self.context_tokens = context_tokens
        self.spec, self.run_tag = spec, run_id.removeprefix("run_")
        self.environment_s = 0.0  # time spent waiting for the environment, since last read

    def run(
        self,
        step: int,
        examples: list[Example],
        k: int,
        sampling: SamplingSpec,
        purpose: str = "train",
        groups: list[int] | None = None,
    ) -> list[Rollout]:
        """k episodes of each example, played to their end; `groups`: each example's group index
        in the step (ids name it), default 0, 1, ..."""
        batch = batch_name(step, purpose)
        numbers = groups or range(len(examples))
        episodes: list[list[_Episode]] = []
        for g, example in zip(numbers, examples, strict=True):
            _, ids = self.renderer.prompt(example, as_chat=True)
            episodes.append(
                [
                    _Episode(
                        EpisodeView(
                            f"ep_{self.run_tag}_{batch}_{g}_{i}",
                            f"grp_{self.run_tag}_{batch}_{g}",
                            example.item,
                            [dict(m) for m in example.conversation],
                        ),
                        ids,
                    )
                    for i in range(k)
                ]
            )
        flat = [e for group in episodes for e in group]
        budget = min(sampling.max_new_tokens, self.spec.max_episode_tokens)
        first = self.engine.generate(
            [group[0].prompt_ids for group in episodes],
            k,
            sampling.model_copy(update={"max_new_tokens": budget}),
        )
        for group, rollout in zip(episodes, first, strict=True):
            for episode, completion in zip(group, rollout.completions, strict=True):
                self._sampled(episode, completion)
        turn = 1
        while live := [e for e in flat if e.end is None]:
            self._answer(step, turn, live, purpose)
            turn += 1
            live = [e for e in live if e.end is None]
            by_budget: dict[int, list[_Episode]] = {}
            for e in live:
                by_budget.setdefault(min(sampling.max_new_tokens, self._room(e)), []).append(e)
            for room, part in by_budget.items():
                made = self.engine.generate(
                    [e.prompt_ids + e.tokens for e in part],
                    1,
                    sampling.model_copy(update={"max_new_tokens": room}),
                )
                for e, rollout in zip(part, made, strict=True):
                    self._sampled(e, rollout.completions[0])
        self.engine.offload()
        return [
            Rollout(prompt_ids=group[0].prompt_ids, completions=[e.completion() for e in group])
            for group in episodes
        ]

    def _room(self, e: _Episode) -> int:
        """Tokens the episode may still add: within max_episode_tokens, and within the model's
        context with its prompt."""
        room = self.spec.max_episode_tokens - len(e.tokens)
        if self.context_tokens is not None:
            room = min(room, self.context_tokens - len(e.prompt_ids) - len(e.tokens))
        return room

    def _sampled(self, e: _Episode, c: Completion) -> None:
        """Append one sampled assistant turn, exactly as sampled."""
        e.tokens += c.token_ids
        e.mask += [1] * len(c.token_ids)
        if e.logprobs is not None and c.logprobs is not None:
            e.logprobs += c.logprobs
        else:
            e.logprobs = None
        e.assistant_turns += 1
        message = assistant_message(c.text, f"call_{e.view.episode_id}_{e.assistant_turns}")
        e.view.messages.append(message)
        e.turns.append(Turn(message, len(c.token_ids), trained=True))
        e.text = message.get("content") or ""

    def _answer(self, step: int, turn: int, live: list[_Episode], purpose: str) -> None:
        """The environment's replies to every live episode; each ends, or goes on with the
        reply's messages rendered after its turn (untrained)."""
        start = time.perf_counter()
        replies = self.environment.step(step, turn, [e.view for e in live], purpose)
        self.environment_s += time.perf_counter() - start
        for e, reply in zip(live, replies, strict=True):
            self._continue(e, reply)

    def _continue(self, e: _Episode, reply: Reply) -> None:
        if reply.done:
            e.end, e.reward = DONE, reply.reward
            return
        if e.assistant_turns >= self.spec.max_turns:
            e.end = MAX_TURNS
            return
        rendered = self.renderer.close_turn(e.tokens) + self.renderer.observation(reply.messages)
        if self._room(e) - len(rendered) < 1:
            e.end = MAX_TOKENS  # no room for one more sampled token
            return
        e.tokens += rendered
        e.mask += [0] * len(rendered)
        if e.logprobs is not None:
            e.logprobs += [0.0] * len(rendered)  # never compared: masked
        for i, message in enumerate(reply.messages):
            e.view.messages.append(message)
            e.turns.append(Turn(message, len(rendered) if i == 0 else 0, trained=False))


def episode_runner(settings, recorder, spec: RunSpec, engine, renderer, model):
    """The run's EpisodeRunner when it has an environment (else None): a webhook's retries
    recorded as environment.retry events, a sandbox's view without the data directory, turns
    bounded by the model's context."""
    if spec.environment is None:
        return None
    webhooks = WebhookContext.of_run(settings, recorder, retry_event=EventType.ENVIRONMENT_RETRY)
    hidden = (str(settings.resolved_data_dir),)
    environment = build_environment(spec.environment, spec.dataset.answer_field, webhooks, hidden)
    context = spec.rollout.max_model_len or getattr(model.config, "max_position_embeddings", None)
    return EpisodeRunner(engine, renderer, environment, spec.environment, recorder.run_id, context)
