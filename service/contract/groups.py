"""Off-policy groups (files of purpose "offpolicy", and groups posted to a run): one group per
line, in one of two forms.

Text: the prompt and its completions as strings,

    {"prompt": str, "completions": [str, ...], "rewards": [float, ...]?, "source": str | [str]?,
     "answer": str?}

Chat (DESIGN.md §v2.1): the prompt as chat messages, each completion an episode,

    {"messages": [<prompt messages: system, user, ...>], "tools": [<function schemas>]?,
     "episodes": [[<assistant>, <tool | user>..., <assistant>, ...], ...],
     "rewards": [float, ...]?, "source": str | [str]?, "answer": str?, ...any other fields}

`messages` and `tools` are a chat row's (service/contract/chat.py), rendered by the run's chat
template with the generation prompt, exactly as the run renders its own episodes' prompts. An
episode is the conversation after the prompt: it starts and ends with an assistant message,
with the tool results and user replies that answered it in between. Only the assistant
messages train: their tokens as the template renders them (content, tool calls) and the
template's end-of-turn token; the prompt, the other messages and the template's scaffolding
are context. A single-turn chat group is episodes of one assistant message each. Other fields
travel with the group to the run's reward as its `item`, as a chat row's do.

In either form `rewards` (one per completion or episode) are used as given; a group without
them is scored by the run's reward (with `answer`). A group of fewer completions than the run's
algorithm.group_size is topped up with completions the run samples from its policy (and then
has no rewards of its own). `source` labels where the completions came from (a teacher,
production logs, an older checkpoint), for the whole group or per completion: a group may mix
sources.

Traffic (DESIGN.md §v2.2), the stored form of a group of served completions: posted as
completion ids, resolved by the API into each episode's turns with their exact token ids,

    {"traffic": [{"turns": [{"completion_id": str, "prompt_ids": [int, ...],
                             "token_ids": [int, ...], "weights_step": int | None}, ...],
                  "reward": float}, ...],
     "source": str}

exactly algorithm.group_size episodes, each of its completions in order; a turn's context is
its own `prompt_ids` and what it trains is its sampled `token_ids` (workers/traffic.py).
"""

import re
from typing import Any

from gvpo_client.signing import is_reward
from service.contract.chat import chat_problem, message_problem

SOURCE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_SOURCE = "offpolicy"  # a group's source when it names none
POLICY = "policy"  # the source of a completion the run sampled itself
KEYS = {"prompt", "completions", "rewards", "source", "answer"}
# A chat group's own fields; any others are its `item`.
CHAT_KEYS = {"messages", "tools", "episodes", "rewards", "source"}
EPISODE_ROLES = ("assistant", "tool", "user")


TRAFFIC_KEYS = {"traffic", "source"}
TURN_KEYS = {"completion_id", "prompt_ids", "token_ids", "weights_step"}


def is_traffic_group(row: dict) -> bool:
    return "traffic" in row


def is_chat_group(row: dict) -> bool:
    return not is_traffic_group(row) and ("messages" in row or "episodes" in row)


def group_size(row: dict) -> int:
    """How many completions (or episodes) a valid group has."""
    if is_traffic_group(row):
        return len(row["traffic"])
    return len(row["episodes"] if is_chat_group(row) else row["completions"])


def _noun(row: dict) -> str:
    return "completion" if not (is_chat_group(row) or is_traffic_group(row)) else "episode"


def group_item(row: dict) -> dict[str, Any]:
    """A chat group's fields other than its own: what rewards get as the group's `item`."""
    return {key: value for key, value in row.items() if key not in CHAT_KEYS}


def group_problem(row: dict) -> str | None:
    """What is wrong with one group row as a user writes it (text or chat), or None. The
    stored form of served completions is the API's to make, never a user's: see
    traffic_problem."""
    problem = _chat_problem(row) if is_chat_group(row) else _text_problem(row)
    if problem:
        return problem
    return _labels_problem(row, group_size(row), _noun(row))


def traffic_problem(row: dict) -> str | None:
    """What is wrong with a group of served completions in its stored form, or None."""
    if problem := _traffic_shape_problem(row):
        return problem
    return _labels_problem(row, group_size(row), "episode")


def _traffic_shape_problem(row: dict) -> str | None:
    if not is_traffic_group(row):
        return "has no 'traffic'"
    if unknown := sorted(set(row) - TRAFFIC_KEYS):
        return f"unknown keys {unknown} (a traffic group has {sorted(TRAFFIC_KEYS)})"
    episodes = row["traffic"]
    if not isinstance(episodes, list) or not episodes:
        return "'traffic' must be a list of at least 1 episode"
    for index, episode in enumerate(episodes):
        if problem := _traffic_episode_problem(episode):
            return f"traffic[{index}]{problem}"
    return None


def _traffic_episode_problem(episode: Any) -> str | None:
    if not isinstance(episode, dict) or set(episode) != {"turns", "reward"}:
        return " must be {'turns': [...], 'reward': a number}"
    if not is_reward(episode["reward"]):
        return " 'reward' must be a finite number"
    turns = episode["turns"]
    if not isinstance(turns, list) or not turns:
        return " 'turns' must be a list of at least 1 completion"
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or set(turn) != TURN_KEYS:
            return f"['turns'][{index}] must have exactly {sorted(TURN_KEYS)}"
        ids_ok = all(
            isinstance(turn[key], list) and all(_is_id(i) for i in turn[key])
            for key in ("prompt_ids", "token_ids")
        )
        if not ids_ok or not turn["prompt_ids"]:
            return f"['turns'][{index}] 'prompt_ids' and 'token_ids' must be token ids (prompt: 1+)"
        step = turn["weights_step"]
        if step is not None and not _is_id(step):
            return f"['turns'][{index}] 'weights_step' must be a step number or null"
    return None


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text_problem(row: dict) -> str | None:
    if unknown := sorted(set(row) - KEYS):
        return f"unknown keys {unknown} (a group has {sorted(KEYS)})"
    if not isinstance(row.get("prompt"), str) or not row["prompt"]:
        return "'prompt' must be a non-empty string"
    completions = row.get("completions")
    if (
        not isinstance(completions, list)
        or not completions
        or not all(isinstance(c, str) for c in completions)
    ):
        return "'completions' must be a list of at least 1 string"
    return None


def _chat_problem(row: dict) -> str | None:
    if mixed := sorted({"prompt", "completions"} & set(row)):
        return (
            f"has {mixed} and chat messages: a group is either text ('prompt', 'completions') "
            "or chat ('messages', 'episodes')"
        )
    if "reward" in row:
        return "has 'reward': a group's rewards are 'rewards', one per episode"
    if "messages" not in row:
        return "has 'episodes' but no 'messages': a chat group's prompt is its 'messages'"
    if problem := chat_problem(row):
        return problem
    return episodes_problem(row.get("episodes"))


def episodes_problem(episodes: Any) -> str | None:
    """What is wrong with a group's episodes, or None."""
    if not isinstance(episodes, list) or not episodes:
        return "'episodes' must be a list of at least 1 episode (a list of messages)"
    for index, episode in enumerate(episodes):
        if problem := episode_problem(episode):
            return f"episodes[{index}]{problem}"
    return None


def episode_problem(episode: Any) -> str | None:
    """What is wrong with one episode, or None; the problem reads after the episode's name
    (" must ...", "[2] 'role' ...")."""
    if not isinstance(episode, list) or not episode:
        return " must be a non-empty list of messages"
    for index, message in enumerate(episode):
        if problem := message_problem(message, EPISODE_ROLES) or _calls_problem(message):
            return f"[{index}] {problem}"
    if episode[0]["role"] != "assistant":
        return (
            " must start with an assistant message: an episode is what followed the prompt, "
            "so put the conversation before the first assistant turn in 'messages'"
        )
    if episode[-1]["role"] != "assistant":
        return (
            " must end with an assistant message: what follows the last assistant turn "
            "trains nothing, so leave it out"
        )
    return None


def _calls_problem(message: dict) -> str | None:
    """An assistant message's tool calls are rendered into the tokens that train, so each must
    be OpenAI's {"function": {"name", "arguments"}} for the chat template to render it."""
    for index, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function")
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), (str, dict))
        ):
            return (
                f'tool_calls[{index}] must be {{"function": {{"name": a string, '
                '"arguments": a JSON string or object}}'
            )
    return None


def _labels_problem(row: dict, n: int, noun: str) -> str | None:
    rewards = row.get("rewards")
    if rewards is not None and (
        not isinstance(rewards, list) or len(rewards) != n or not all(is_reward(r) for r in rewards)
    ):
        return f"'rewards' must be {n} finite numbers, one per {noun}"
    source = row.get("source", DEFAULT_SOURCE)
    sources = source if isinstance(source, list) else [source]
    if isinstance(source, list) and len(source) != n:
        return f"'source' must be one label or {n}, one per {noun}"
    if not all(isinstance(s, str) and SOURCE.match(s) for s in sources):
        return "'source' labels are 1-64 letters, digits, '_', '.' or '-'"
    if "answer" in row and not isinstance(row["answer"], (str, int, float)):
        return "'answer' must be a string or a number"
    return None


def fit_problem(row: dict, k: int, processes: int) -> str | None:
    """What keeps a valid group from training in a run whose groups are of k, or None. A group
    of fewer completions is topped up with the policy's own samples and scored whole by the
    run's reward, so it carries no rewards of its own; and since a step's engines must all
    generate alike, topping up is for runs of one training process."""
    n = group_size(row)
    noun = _noun(row) + "s"
    if is_traffic_group(row) and n != k:
        return (
            f"has {n} {noun}; a group of served completions is scored as given and not "
            f"topped up, so it has exactly algorithm.group_size ({k})"
        )
    if n > k:
        return (
            f"has {n} {noun}; algorithm.group_size is {k}, the most a group may have "
            "(fewer are topped up with the policy's own samples)"
        )
    if n < k and row.get("rewards") is not None:
        return (
            f"has {n} {noun} with rewards; a group of fewer than algorithm.group_size "
            f"({k}) is topped up with the policy's own samples and scored whole by the "
            f"run's reward: leave its rewards out, or give it {k} {noun}"
        )
    if n < k and processes > 1:
        return (
            f"has {n} {noun}, fewer than algorithm.group_size ({k}): topping a group "
            f"up is for runs of one training process, and this one has {processes}"
        )
    return None
