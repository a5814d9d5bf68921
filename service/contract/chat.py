"""Chat rows (DESIGN.md §v2.1): a train, eval or off-policy row in OpenAI's chat form,

    {"messages": [{"role": "system"|"developer"|"user"|"assistant"|"tool", "content": str,
                   "tool_calls"?: [...], "tool_call_id"?: str, "name"?: str}],
     "tools"?: [<OpenAI function schemas>], ...any other fields}

rendered by the model tokenizer's chat template. Other fields travel to rewards and
environments as the episode's `item`. What a message may hold is checked here, once, for the
upload (a bad line is a 400 naming it) and for the worker. OpenAI's `developer` role (its name
for instructions to the model) reaches the chat template as `system`, the role templates know.
"""

from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
TEMPLATE_ROLES = {"developer": "system"}  # a role -> the one chat templates render it as
MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name"}
CHAT_KEYS = ("messages", "tools")  # what a chat row's `item` leaves out


def is_chat(row: dict) -> bool:
    return "messages" in row


def message_problem(message: Any, roles: tuple[str, ...] = ROLES) -> str | None:
    """What is wrong with one message, or None."""
    if not isinstance(message, dict):
        return "must be an object with 'role' and 'content'"
    if unknown := sorted(set(message) - MESSAGE_KEYS):
        return f"has unknown keys {unknown} (a message has {sorted(MESSAGE_KEYS)})"
    if message.get("role") not in roles:
        return f"'role' must be one of {', '.join(roles)}; got {message.get('role')!r}"
    content = message.get("content")
    calls = message.get("tool_calls")
    if content is None and not calls:
        return "needs 'content' (a string), or 'tool_calls' on an assistant message"
    if content is not None and not isinstance(content, str):
        return "'content' must be a string"
    if calls is not None:
        if message["role"] != "assistant":
            return "only assistant messages carry 'tool_calls'"
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            return "'tool_calls' must be a list of objects"
    for key in ("tool_call_id", "name"):
        if key in message and not isinstance(message[key], str):
            return f"'{key}' must be a string"
    return None


def chat_problem(row: dict) -> str | None:
    """What is wrong with a chat row, or None: a non-empty list of valid messages, and tools
    (when given) a list of objects."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of messages"
    for index, message in enumerate(messages):
        if problem := message_problem(message):
            return f"messages[{index}] {problem}"
    tools = row.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
    ):
        return "'tools' must be a list of objects (OpenAI function schemas)"
    return None


def fine_tune_problem(row: dict) -> str | None:
    """What keeps a row of a `fine-tune` file from being a prompt to train on (OpenAI's
    reinforcement fine-tuning rows: messages the model answers, and any fields the grader
    reads), or None. The chat row itself is checked by chat_problem."""
    if not is_chat(row):
        return (
            "needs 'messages': a fine-tune row is a chat row, {\"messages\": [...], ...any "
            "fields the grader reads as item.<field>}"
        )
    last = row["messages"][-1] if isinstance(row["messages"], list) and row["messages"] else {}
    if isinstance(last, dict) and last.get("role") == "assistant":
        return (
            "ends with an assistant message: the model writes the next assistant message, so "
            "a reinforcement fine-tuning row ends with the user's (or developer's) turn; put "
            "a reference answer in a field of its own for the grader"
        )
    return None


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as the chat template gets them: roles it may not know renamed (TEMPLATE_ROLES)."""
    return [
        {**m, "role": TEMPLATE_ROLES[m["role"]]} if m.get("role") in TEMPLATE_ROLES else m
        for m in messages
    ]


def row_item(row: dict) -> dict:
    """A row's fields other than its messages and tools: what rewards and environments get."""
    return {key: value for key, value in row.items() if key not in CHAT_KEYS}
