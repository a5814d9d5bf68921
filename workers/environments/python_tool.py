"""The built-in `python_tool` environment: the policy runs Python, each call in a new sandbox
(workers/sandbox.py), and reads what it printed.

A call is either an OpenAI tool call of the `python` function on the assistant's new message,
with arguments {"code": "..."} (the episode runner turns `<tool_call>{...}</tool_call>` blocks
of the text into such calls), or, on a message without tool calls, each ```python fenced block
of its text. Every call is answered by one `tool` message: the output, then a status line
("[exit 0]", "[killed: time limit 5 s]"). A failed, refused or killed call is news for the
policy, not the end of the episode; a turn without a call ends it when done_without_call
(without a reward of its own: the run's reward scores the final conversation).
"""

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.contract.environments import PythonToolParams
from workers.environments.base import EpisodeView, Reply
from workers.sandbox import check_sandbox, run_python

TOOL_NAME = "python"
FENCED = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL)
NO_CALL = (
    f'No tool call found. Call the `{TOOL_NAME}` tool with {{"code": ...}}, or write the '
    "code in a ```python block."
)


@dataclass(frozen=True)
class Call:
    """One tool call of an assistant message: code to run, or why there is none."""

    id: str | None  # the tool call's id; None for a fenced block
    code: str | None = None
    refusal: str | None = None  # said instead of running anything


def _from_tool_call(call: Any) -> Call:
    if not isinstance(call, dict):
        return Call(None, refusal="a tool call must be an object")
    call_id = call.get("id") if isinstance(call.get("id"), str) else None
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    name = function.get("name")
    if name != TOOL_NAME:
        return Call(call_id, refusal=f"unknown tool {name!r}: the only tool is `{TOOL_NAME}`")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            return Call(call_id, refusal=f"the arguments are not JSON: {exc}")
    if not isinstance(arguments, dict) or not isinstance(arguments.get("code"), str):
        return Call(call_id, refusal='the arguments must be an object {"code": "<the script>"}')
    return Call(call_id, code=arguments["code"])


def calls_of(messages: list[dict[str, Any]]) -> list[Call]:
    """The calls of the conversation's last message, when it is the assistant's."""
    last = messages[-1] if messages else {}
    if last.get("role") != "assistant":
        return []
    if last.get("tool_calls"):
        return [_from_tool_call(call) for call in last["tool_calls"]]
    content = last.get("content")
    text = content if isinstance(content, str) else ""
    return [Call(None, code=code) for code in FENCED.findall(text)]


def _message(call: Call, content: str) -> dict[str, Any]:
    message = {"role": "tool", "content": content}
    if call.id is not None:
        message["tool_call_id"] = call.id
    return message


class PythonToolEnvironment:
    name = "python_tool"

    def __init__(
        self,
        params: PythonToolParams,
        data_dir: Path | None = None,
        hide: tuple[str | Path, ...] = (),
        concurrency: int | None = None,
        python: str | None = None,
    ) -> None:
        """`data_dir` (the service's) and `hide` are hidden from the code besides the
        sandbox's defaults; `concurrency`: sandboxes at once (default: the CPU count);
        `python`: the interpreter (default: the worker's, without its virtual environment).
        Raises SandboxUnavailable (a RunError) when no sandbox can start here."""
        check_sandbox(python)
        self.params = params
        self.data_dir, self.hide, self.python = data_dir, tuple(hide), python
        self.pool = ThreadPoolExecutor(
            max_workers=concurrency or os.cpu_count() or 4, thread_name_prefix="python-tool"
        )

    def _answer(self, call: Call) -> str:
        if call.refusal is not None:
            return f"[refused: {call.refusal}]"
        result = run_python(
            call.code,
            self.params,
            data_dir=self.data_dir,
            hide=self.hide,
            python=self.python,
        )
        status = result.status(self.params)
        return f"{result.output.rstrip()}\n{status}" if result.output.strip() else status

    def step(self, step: int, turn: int, episodes: list[EpisodeView], purpose: str) -> list[Reply]:
        calls = [calls_of(episode.messages) for episode in episodes]
        # every call of every episode at once, each in its own sandbox
        answers = [[self.pool.submit(self._answer, call) for call in mine] for mine in calls]
        replies = []
        for mine, futures in zip(calls, answers, strict=True):
            if mine:
                messages = [_message(c, f.result()) for c, f in zip(mine, futures, strict=True)]
                replies.append(Reply(messages=messages))
            elif self.params.done_without_call:
                replies.append(Reply(done=True))
            else:
                replies.append(Reply(messages=[{"role": "user", "content": NO_CALL}]))
        return replies

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
