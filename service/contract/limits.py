"""How big anything in a run spec may be: every number and string has a bound, so that what the
API accepts fits the database (32-bit integer columns), the hardware and a run that can finish,
and a request past one gets a 422 naming it instead of a server error later. Text may not hold
NUL (PostgreSQL cannot store it), and numbers must be finite.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

INT32_MAX = 2**31 - 1  # the database's integer columns (steps, counts)

MAX_STEPS = 1_000_000
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


def _no_nul(value: Any) -> Any:
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("must not contain the NUL character (\\u0000)")
    if isinstance(value, list | tuple):
        for item in value:
            _no_nul(item)
    return value


class Strict(BaseModel):
    """A part of the contract: unknown fields are refused (a typo never falls back to a default),
    numbers must be finite and text may not hold NUL."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    _text_without_nul = field_validator("*")(_no_nul)
