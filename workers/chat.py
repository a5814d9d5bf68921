"""Chat rows as token ids: the prompt of a row, and the tokens a turn adds to an episode.

Everything the policy sees is rendered by the model tokenizer's chat template (or the run's
`model.chat_template`), and nothing the policy sampled is ever rendered again: an episode's
context after turn t is the context before it, plus the ids sampled in turn t exactly as
sampled, plus the template's own tokens that close an assistant turn, plus the rendering of
the environment's new messages with the next generation prompt. The last two are found by
rendering a fixed two-message conversation with and without the new part and tokenising the
difference, so any template that renders a conversation message by message works.
"""

import json
import re
from typing import Any

from workers.data import Example

# A fixed conversation to render differences against: what a template puts after an
# assistant message, and what it renders for new messages after one.
_BASE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class ChatTemplateError(ValueError):
    """The chat template cannot render what a run needs; the message says what."""


class Renderer:
    """Token ids of prompts and environment turns, by the model's chat template."""

    def __init__(self, tokenizer, eos_ids: list[int], chat_template: str | None = None) -> None:
        self.tokenizer, self.eos_ids, self.template = tokenizer, set(eos_ids), chat_template
        self._turn_end: list[int] | None = None

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
        if self._turn_end is None:
            full = self.render(_BASE)
            cut = full.rfind(_BASE[-1]["content"]) + len(_BASE[-1]["content"])
            self._turn_end = self.encode(full[cut:])
        end = self._turn_end
        if sampled and sampled[-1] in self.eos_ids:
            return end[1:] if end and end[0] in self.eos_ids else end
        return end

    def observation(self, messages: list[dict], tools=None) -> list[int]:
        """The ids of the environment's new `messages` after a closed assistant turn, with the
        next generation prompt."""
        before = self.render(_BASE, tools)
        after = self.render(_BASE + messages, tools, add_generation_prompt=True)
        if not after.startswith(before):
            raise ChatTemplateError(
                "the chat template renders a conversation differently once messages follow "
                "an assistant turn, so a turn cannot be appended to the sampled tokens; set "
                "model.chat_template to one that renders message by message"
            )
        return self.encode(after[len(before) :])


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
