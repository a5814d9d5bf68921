"""How big anything in a request may be (a run spec, a query, a posted body, a gRPC field): every
number and string has a bound, so that what the API accepts fits the database (32-bit integer
columns), the hardware and a run that can finish, and a request past one gets a 4xx naming it
instead of a server error later. Text may not hold NUL (PostgreSQL cannot store it), and
numbers must be finite.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

INT32_MAX = 2**31 - 1  # the database's integer columns (steps, counts, event ids)

MAX_STEPS = 1_000_000
MAX_LAG = 8  # training.max_lag: rollouts generated ahead, each holding a copy of the weights
MAX_PROMPTS_PER_STEP = 65_536
MAX_GROUP_SIZE = 512
MAX_TOKENS = 1_048_576  # max_new_tokens, max_model_len: beyond any model's context today
MAX_BATCH_TOKENS = 16_777_216
MAX_LORA_RANK = 4_096
MAX_KEPT_CHECKPOINTS = 10_000
MAX_EVAL_PROMPTS = 1_000_000
MAX_STOP_STRINGS = 32
MAX_TEXT = 1_000  # a stop string, a field name, a pattern, a module name
MAX_PATH = 4_096
MAX_ID = 64  # ids the service made (file_..., ckpt_...)
MAX_PATTERNS = 64
MAX_IDEMPOTENCY_KEY = 200  # runs.idempotency_key
MAX_FILENAME = 255  # files.filename
MAX_RUNS_PAGE = 100  # runs in one page of a listing
MAX_QUERY_TEXT = 8_192  # a query parameter listing names
MAX_CREDENTIAL = 1_000  # an Authorization or signature header: far past any key or signature
# The webhook protocol: a request's items (reward.max_items_per_request), and the request and
# sample ids the worker makes (reward_requests.id is 80 characters).
MAX_ITEMS_PER_REQUEST = 10_000
MAX_WEBHOOK_ID = 80
# The loss dry-run's group: text as long as a long prompt, and numbers whose squared GVPO
# weights, summed over a group, stay far inside float32 (the learner's precision).
MAX_PROMPT_CHARS = 100_000
MAX_REWARD = 1e9
MAX_BETA = 1e4


def has_nul(value: Any) -> bool:
    """Whether any text in `value` (a string, or lists and dicts of them) holds NUL. A loop, not
    recursion: free-form parts (posted groups, file rows) may nest as deep as JSON allows."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str) and "\x00" in item:
            return True
        if isinstance(item, dict):
            pending += [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple):
            pending += item
    return False


def _no_nul(value: Any) -> Any:
    if has_nul(value):
        raise ValueError("must not contain the NUL character (\\u0000)")
    return value


class Strict(BaseModel):
    """A part of the contract: unknown fields are refused (a typo never falls back to a default),
    numbers must be finite and text may not hold NUL."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    _text_without_nul = field_validator("*")(_no_nul)


def params_of(name: str, model: type[BaseModel], params: dict) -> BaseModel:
    """A built-in's `params` validated as its parameter model; ValueError naming the built-in
    and each bad field as `params.<field>`."""
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        listed = "; ".join(
            f"params.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"{name}: {listed}") from None
