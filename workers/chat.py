"""Chat rows as token ids: the prompt of a row, and the tokens a turn adds to an episode.

Everything the policy sees is rendered by the model tokenizer's chat template (or the run's
`model.chat_template`), and nothing the policy sampled is ever rendered again: an episode's
context after turn t is the context before it, plus the ids sampled in turn t exactly as
sampled, plus the template's own tokens that close an assistant turn, plus the rendering of
the environment's new messages with the next generation prompt. The last two are found by
rendering a fixed two-message conversation with and without the new part and tokenising the
difference, so any template that renders a conversation message by message works.

A conversation written elsewhere (an off-policy episode, the dry-run's) is split the same way,
by rendering each prefix of it and tokenising the difference: its assistant messages become the
ids a policy would have sampled (what the template renders for them, and its end-of-turn
token), the rest the ids the run itself would have put between the turns.
"""

import json
import re
from dataclasses import dataclass
from typing import Any

from workers.data import Example
from workers.rollout.base import Completion

# A fixed conversation to render differences against: what a template puts after an
# assistant message, and what it renders for new messages after one.
_BASE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class ChatTemplateError(ValueError):
    """The chat template cannot render what a run needs; the message says what."""


@dataclass(frozen=True)
class EpisodeIds:
    """A written episode as the learner takes one (workers/rollout/base.py Completion)."""

    prompt_ids: list[int]  # the prompt with the generation prompt, as Renderer.prompt gives it
    token_ids: list[int]  # everything after the prompt, up to the last assistant turn's end
    mask: list[int]  # 1 on the assistant messages' ids, 0 on the template's and the others'
    turn_tokens: list[int]  # per message: its ids in token_ids (see Turn.tokens)


class Renderer:
    """Token ids of prompts and environment turns, by the model's chat template."""

    def __init__(self, tokenizer, eos_ids: list[int], chat_template: str | None = None) -> None:
        self.tokenizer, self.eos_ids, self.template = tokenizer, set(eos_ids), chat_template
        self.eos_id = eos_ids[0]  # what a policy samples to end a turn the template doesn't
        self._base: str | None = None  # _BASE rendered: what a turn or messages extend
        self._turn_end: list[int] | None = None
        self._turn_end_text: str | None = None

    def render(self, messages: list[dict], tools=None, add_generation_prompt=False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                chat_template=self.template,
            )
        except Exception as exc:  # jinja's errors, or "no chat template"
            raise ChatTemplateError(
                f"the chat template could not render the conversation: {type(exc).__name__}: "
                f"{exc} (set model.chat_template, or use a model whose tokenizer has one)"
            ) from None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, example: Example, as_chat: bool = False) -> tuple[str, list[int]]:
        """(the prompt's text, its ids): a plain prompt as the tokenizer encodes it (unless
        `as_chat`: an episode's prompt is always a conversation), a chat row rendered with
        the generation prompt."""
        if example.messages is None and not as_chat:
            return example.prompt, self.tokenizer(example.prompt)["input_ids"]
        text = self.render(example.conversation, example.tools, add_generation_prompt=True)
        return text, self.encode(text)

    def close_turn(self, sampled: list[int]) -> list[int]:
        """The template's tokens after a sampled assistant turn, up to where the next message
        starts: its end-of-turn token when the policy did not sample one, and what follows it."""
        end = self._end()
        if sampled and sampled[-1] in self.eos_ids:
            return end[1:] if end and end[0] in self.eos_ids else end
        return end

    def _end(self) -> list[int]:
        """The ids the template puts after an assistant message's content (and its text)."""
        if self._turn_end is None:
            full = self._base_text()
            cut = full.rfind(_BASE[-1]["content"]) + len(_BASE[-1]["content"])
            self._turn_end_text = full[cut:]
            self._turn_end = self.encode(self._turn_end_text)
        return self._turn_end

    def _base_text(self) -> str:
        if self._base is None:
            self._base = self.render(_BASE)
        return self._base

    def observation(self, messages: list[dict]) -> list[int]:
        """The ids of the environment's new `messages` after a closed assistant turn, with the
        next generation prompt."""
        after = self.render(_BASE + messages, add_generation_prompt=True)
        return self.encode(_extension(self._base_text(), after, "the environment's messages"))

    def episode(self, prompt: list[dict], turns: list[dict], tools=None) -> EpisodeIds:
        """A conversation written elsewhere as ids: `prompt` rendered with the generation
        prompt (as prompt(as_chat=True) renders a row of these messages), then `turns` (which
        start and end with an assistant message) as the run's own episode would hold them. An
        assistant message is what the template renders for it up to its turn end, then the
        template's end-of-turn token (EOS where the turn end has none, as a policy stops): the
        ids a policy samples, trained. The rest of its turn end, and the messages after it
        rendered with the next generation prompt, are not. The ids stop at the last turn's
        end-of-turn token, where the run's own episodes stop."""
        if not turns or turns[0]["role"] != "assistant" or turns[-1]["role"] != "assistant":
            raise ValueError("an episode starts and ends with an assistant message")
        end, end_text = self._end(), self._turn_end_text
        ends_with_eos = bool(end) and end[0] in self.eos_ids
        text = self.render(prompt, tools, add_generation_prompt=True)
        out = EpisodeIds(self.encode(text), [], [], [])
        closed = 0  # the last assistant turn's ids after its end-of-turn token
        block = 0  # the first message since the last assistant turn
        for j, message in enumerate(turns):
            if message["role"] != "assistant":
                out.turn_tokens.append(0)
                if turns[j - 1]["role"] == "assistant":
                    block = j
                if turns[j + 1]["role"] != "assistant":
                    continue  # rendered with the messages that follow it
                # the messages since the last assistant turn, with the next generation prompt
                after = self.render(prompt + turns[: j + 1], tools, add_generation_prompt=True)
                rendered = self.encode(_extension(text, after, f"message {j} of the episode"))
                out.token_ids.extend(rendered)
                out.mask.extend([0] * len(rendered))
                out.turn_tokens[block] = closed + len(rendered)  # as episodes.py counts them
                text = after
                continue
            after = self.render(prompt + turns[: j + 1], tools)
            body = _extension(text, after, f"message {j} of the episode")
            if not body.endswith(end_text):
                raise ChatTemplateError(
                    f"the chat template ends message {j} of the episode (an assistant "
                    f"message) otherwise than its other assistant turns, with {end_text!r}, "
                    "so its end-of-turn token cannot be found; set model.chat_template to "
                    "one that renders message by message"
                )
            sampled = self.encode(body[: len(body) - len(end_text)])
            sampled += end[:1] if ends_with_eos else [self.eos_id]
            tail = end[1:] if ends_with_eos else end
            closing = tail if j < len(turns) - 1 else []
            out.token_ids.extend(sampled + closing)
            out.mask.extend([1] * len(sampled) + [0] * len(closing))
            out.turn_tokens.append(len(sampled))
            closed, text = len(closing), after
        return out


def _extension(before: str, after: str, what: str) -> str:
    """What `after` (a conversation rendered with one more part) adds to `before`."""
    if not after.startswith(before):
        raise ChatTemplateError(
            f"the chat template renders a conversation differently once it is continued "
            f"with {what}, so the turns cannot be told apart; set model.chat_template to "
            "one that renders message by message"
        )
    return after[len(before) :]


def assistant_message(text: str, call_prefix: str) -> dict[str, Any]:
    """The policy's turn as an OpenAI assistant message: `<tool_call>{"name", "arguments"}
    </tool_call>` blocks (the Hermes/Qwen convention) become `tool_calls` (ids `call_prefix`
    and a number, the same on a replayed step), the rest content."""
    calls = []
    for raw in TOOL_CALL.findall(text):
        try:
            call = json.loads(raw)
        except json.JSONDecodeError:
            continue  # not a call: stays in the content for the environment to see
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        arguments = call.get("arguments", {})
        calls.append(
            {
                "id": f"{call_prefix}_{len(calls)}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                },
            }
        )
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["content"] = TOOL_CALL.sub("", text).strip()
        message["tool_calls"] = calls
    return message


def final_conversation(example: Example, completion: Completion) -> list[dict] | None:
    """The conversation a reward sees: a chat row's messages and the policy's turn, or an
    episode's every turn (None for a plain prompt's single completion)."""
    if completion.turns is not None:
        return example.conversation + [t.message for t in completion.turns]
    if example.messages is not None:
        return example.conversation + [{"role": "assistant", "content": completion.text}]
    return None
