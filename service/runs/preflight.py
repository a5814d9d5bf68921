"""Submission-time checks of the model: what would otherwise fail only on the GPU worker, after
the run waited in a queue and loaded its weights, is refused at once with a 422 naming the field.

- model.path is a directory whose config.json parses and names a model type, and whose
  tokenizer loads (the weights never are read).
- rollout.max_model_len is within the model's context (vLLM refuses to start above it).
- Every prompt of the train and eval files, tokenised as the rollout engines do, plus
  sampling.max_new_tokens fits the limit (rollout.max_model_len, else the model's context);
  every off-policy group's prompt plus its longest completion plus EOS fits it too (the learner
  scores those whole sequences), and plus max_new_tokens for a group of fewer than k that the
  run tops up with its own samples. A chat group's prompt and episodes are counted by their
  messages' text, as chat rows' prompts are (the worker renders templates, not the API).

The API sees model.path only where it shares a file system with the workers; a hub id, or a
cluster's model volume the API does not mount, is left to the worker (settings.model_path_check
says how strict to be). Where the context cannot be read from the config, the check accepts:
the worker stays the last judge, a check here only saves it the trouble.

The API process loads no model library (torch, transformers: service/contract says why): it
reads config.json as JSON and the tokenizer with the `tokenizers` library, from tokenizer.json,
which is what transformers' fast tokenizers load too. So the worker, not this check, finds a
model_type that its transformers does not know, and a model with only a slow tokenizer's files
gets no token-budget checks here.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session
from tokenizers import Tokenizer

from gvpo_client.paths import is_local
from service.config import Settings
from service.contract.chat import is_chat
from service.contract.files import numbered_rows
from service.contract.groups import group_size, is_chat_group, is_traffic_group
from service.contract.spec import RunSpec
from service.errors import InvalidSpec
from service.files.service import get_file
from service.models import File, Project

FIELD = "model.path"
# Config keys that hold a context length, as vLLM reads them: the smallest one present wins.
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# RoPE scalings whose factor stretches the context past the config's length (vLLM multiplies
# by it); yarn, llama3 and longrope configs already state the stretched length.
STRETCHING_ROPE = ("linear", "dynamic")
TOKENIZE_BATCH = 1024
MODEL_FILES = "config.json, tokenizer files and weights"
MAX_REASON_CHARS = 300
RUN_MODEL = {"path": "the run's model", "adapter": "the run's adapter"}  # in messages
# What a slow (Python) tokenizer reads when a model has no tokenizer.json: transformers converts
# it on the worker; the API, which reads only tokenizer.json, then leaves the budgets to it.
SLOW_TOKENIZER_FILES = (
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)


def _problem(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


def check_model(
    settings: Settings, session: Session, project: Project, spec: RunSpec, shown: dict[str, str]
) -> None:
    """InvalidSpec listing every problem of the run's model and token budgets; nothing to say
    when the API cannot see the model and need not (settings.model_path_check). `spec` has the
    model's folders filled in (runs/sources.py); messages name them as `shown` says."""
    if (seen := _seen_model(settings, spec, shown)) is None:
        return
    config, tokenizer = seen
    if problems := _budget_problems(session, project, spec, context_length(config), tokenizer):
        raise InvalidSpec(problems)


def _seen_model(settings: Settings, spec: RunSpec, shown: dict[str, str]) -> tuple | None:
    """(config, tokenizer) of the run's model where the API sees it and should look, else None;
    InvalidSpec for a model that cannot load, or a path the worker could not see either."""
    path = spec.model.path
    if path is None or settings.model_path_check == "off":
        return None
    if problem := _adapter_problem(settings, spec.model.adapter, shown.get("adapter")):
        raise InvalidSpec([problem])
    directory, kind = _locate(path)
    if kind != "directory":
        if problem := _unseen_path_problem(settings, path, shown["path"], kind):
            raise InvalidSpec([problem])
        return None
    return _load(shown["path"], directory)


def _locate(path: str) -> tuple[Path, str]:
    """The path here, and whether it is a "directory", a "file" or "missing"."""
    try:
        found = Path(path).expanduser()
        return found, "directory" if found.is_dir() else "file" if found.exists() else "missing"
    except (OSError, ValueError, RuntimeError):  # a name too long, a ~user with no home
        return Path(path), "missing"


def _adapter_problem(settings: Settings, adapter: str | None, shown: str | None) -> dict | None:
    """model.adapter, where the API can see it: a PEFT adapter's folder."""
    if adapter is None:
        return None
    directory, kind = _locate(adapter)
    if kind != "directory":
        return _unseen_path_problem(
            settings,
            adapter,
            shown,
            kind,
            "model.adapter",
            "adapter_config.json and the adapter's weights",
        )
    if not (directory / "adapter_config.json").is_file():
        return _problem(
            "model.adapter",
            f"{shown} has no adapter_config.json; give the "
            "folder a PEFT model's save_pretrained wrote (a run's LoRA checkpoint)",
        )
    return None


def _unseen_path_problem(
    settings: Settings,
    path: str,
    shown: str,
    kind: str,
    field: str = FIELD,
    files: str = MODEL_FILES,
) -> dict | None:
    """A model path (the folder, authorised; `shown` how the tenant knows it) that is no
    directory here: a problem when the worker cannot see it either (the embedded stack shares
    this machine) or when the settings demand that the API see every local path; None for a
    hub id or a path on a cluster's worker volume."""
    if kind == "file":
        return _problem(field, f"{shown} is a file; give the directory ({files})")
    strict = settings.model_path_check == "strict"
    if not is_local(path) or not (strict or settings.embedded):
        return None
    why = (
        "GVPO_MODEL_PATH_CHECK is strict: the API must see every local model path"
        if strict
        else "the API and the worker share this machine, so the worker cannot see it either"
    )
    return _problem(field, f"no such directory: {shown} ({why}); give a directory with {files}")


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _load(path: str, directory: Path) -> tuple[dict, Tokenizer | None]:
    """(config.json, tokenizer) of `directory` (`path` names it in messages) as the worker will
    find them, with no remote code and no downloads; InvalidSpec on model.path saying what
    stops them. The tokenizer is None when the
    model has only a slow tokenizer's files (no tokenizer.json), which the API does not read."""

    def refuse(message: str) -> InvalidSpec:
        return InvalidSpec([_problem(FIELD, message)])

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise refuse(
            f"{path} has no config.json, so transformers cannot load it as a model; "
            f"give the directory written by save_pretrained ({MODEL_FILES})"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refuse(
            f"config.json in {path} is not valid JSON ({_reason(exc)}); replace it "
            "with the model's own config.json"
        ) from None
    if not isinstance(config, dict):
        raise refuse(
            f"config.json in {path} is a JSON {type(config).__name__}, not an object; "
            "replace it with the model's own config.json"
        )
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise refuse(
            f"config.json in {path} has no model_type, so transformers cannot tell "
            "which architecture to build; replace it with the model's own config.json"
        )
    return config, _tokenizer(path, directory, refuse)


def _tokenizer(
    path: str, directory: Path, refuse: Callable[[str], InvalidSpec]
) -> Tokenizer | None:
    """The fast tokenizer (tokenizer.json, read by the tokenizers library as transformers reads
    it); None for a model with a slow tokenizer's files only; InvalidSpec without either."""
    fast = directory / "tokenizer.json"
    if fast.is_file():
        try:
            return Tokenizer.from_file(str(fast))
        except Exception as exc:  # tokenizers raises its own Exception subclasses
            raise refuse(
                f"cannot load the tokenizer in {path} (tokenizer.json): "
                f"{_reason(exc)}; the directory needs the model's tokenizer files"
            ) from None
    if any((directory / name).is_file() for name in SLOW_TOKENIZER_FILES):
        return None
    raise refuse(
        f"cannot load the tokenizer in {path}: it has no tokenizer.json (nor a slow "
        "tokenizer's files); the directory needs the model's tokenizer files"
    )


def context_length(config: dict) -> int | None:
    """The model's context in tokens as vLLM derives it: the smallest length key of its (text)
    config, stretched by a linear or dynamic RoPE scaling factor; None when no key is set."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    lengths = [
        v
        for key in CONTEXT_KEYS
        if isinstance(v := text.get(key), int) and not isinstance(v, bool) and v > 0
    ]
    if not lengths:
        return None
    rope = text.get("rope_parameters") or text.get("rope_scaling")
    if not isinstance(rope, dict):
        rope = {}
    # one dict, or one per layer type ({"full_attention": {...}, "sliding_attention": {...}})
    layers = [p for p in rope.values() if isinstance(p, dict)] or [rope]
    factors = [
        p["factor"]
        for p in layers
        if p.get("rope_type", p.get("type")) in STRETCHING_ROPE
        and isinstance(p.get("factor"), (int, float))
        and p["factor"] >= 1
    ]
    return int(min(lengths) * max(factors, default=1))


@dataclass(frozen=True)
class _Limit:
    """The tokens one sequence may hold on the worker, and where that number comes from."""

    tokens: int
    context: int | None  # the model's, from its config
    max_model_len: int | None  # the spec's rollout.max_model_len

    def __str__(self) -> str:
        if self.max_model_len == self.tokens:
            return f"the limit of {self.tokens} tokens (rollout.max_model_len)"
        return f"the model's context of {self.tokens} tokens"

    def remedies(self, *shrink: str) -> str:
        """What to change: the given ways to shrink the sequence, then raising the limit where
        it can be raised, as "a, b or c"."""
        ways = list(shrink)
        if self.context is None and self.max_model_len is not None:
            ways.append("raise rollout.max_model_len")
        elif self.context is not None and self.tokens < self.context:
            ways.append(f"raise rollout.max_model_len (up to the model's context, {self.context})")
        return ways[0] if len(ways) == 1 else f"{', '.join(ways[:-1])} or {ways[-1]}"


def _budget_problems(
    session: Session,
    project: Project,
    spec: RunSpec,
    context: int | None,
    tokenizer: Tokenizer | None,
) -> list[dict]:
    """rollout.max_model_len against the model's context, then every file's sequences against
    the limit. The files were checked (the project's own, with their fields) before this."""
    max_len, problems = spec.rollout.max_model_len, []
    if context is not None and max_len is not None and max_len > context:
        problems.append(
            _problem(
                "rollout.max_model_len",
                f"{max_len} is more than the model's "
                f"context of {context} tokens (its config.json); set it to at "
                f"most {context}, or leave it unset to use the whole context",
            )
        )
    if (limit := _limit(spec, context)) is None or tokenizer is None:
        return problems
    ds = spec.dataset
    for attr in ("train_file", "eval_file"):
        if (file_id := getattr(ds, attr)) is not None:
            problems += _prompt_problems(
                get_file(session, project, file_id), attr, spec, tokenizer, limit
            )
    if ds.offpolicy_file is not None:
        file = get_file(session, project, ds.offpolicy_file)
        problems += _group_problems(
            numbered_rows(file.path),
            spec,
            tokenizer,
            limit,
            lambda line: ("dataset.offpolicy_file", f"the group on line {line} of file {file.id}"),
        )
    return problems


def _limit(spec: RunSpec, context: int | None) -> "_Limit | None":
    known = [n for n in (spec.rollout.max_model_len, context) if n is not None]
    return _Limit(min(known), context, spec.rollout.max_model_len) if known else None


def check_posted_groups(settings: Settings, spec: RunSpec, groups: list[dict]) -> None:
    """Groups posted to a run against its token limit, as check_model checks its offpolicy
    file (InvalidSpec naming groups.<i>); nothing when the API cannot see the model. `spec`
    has the run's model folders filled in."""
    if (seen := _seen_model(settings, spec, RUN_MODEL)) is None:
        return
    config, tokenizer = seen
    if (limit := _limit(spec, context_length(config))) is None or tokenizer is None:
        return
    if problems := _group_problems(
        list(enumerate(groups)), spec, tokenizer, limit, lambda i: (f"groups.{i}", "the group")
    ):
        raise InvalidSpec(problems)


def _token_counts(
    tokenizer: Tokenizer, texts: list[str], add_special_tokens: bool = True
) -> list[int]:
    """How many tokens each text is, with the special tokens the model adds to a prompt (as
    transformers' tokenizer(text) counts them), tokenised in batches."""
    counts = []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        batch = texts[start : start + TOKENIZE_BATCH]
        counts += [
            len(e.ids) for e in tokenizer.encode_batch(batch, add_special_tokens=add_special_tokens)
        ]
    return counts


def _prompt_text(row: dict, field: str) -> str:
    """A row's prompt; for a chat row its messages' text, which the chat template's rendering
    only lengthens (the API does not render templates: the worker does)."""
    if is_chat(row):
        return "\n".join(m.get("content") or "" for m in row["messages"])
    return str(row[field])


def _completion_texts(row: dict) -> list[str]:
    """A group's completions; a chat group's episodes as their messages' text (content and
    tool calls), which the chat template's rendering only lengthens."""
    if not is_chat_group(row):
        return row["completions"]
    return [
        "\n".join(
            (m.get("content") or "") + "".join(json.dumps(c) for c in m.get("tool_calls") or [])
            for m in episode
        )
        for episode in row["episodes"]
    ]


def _prompt_problems(
    file: File, attr: str, spec: RunSpec, tokenizer: Tokenizer, limit: _Limit
) -> list[dict]:
    """The file's longest prompt, as the engines tokenise it, plus sampling.max_new_tokens
    against the limit."""
    rows = numbered_rows(file.path)
    if attr == "eval_file":  # the run evaluates the first eval.max_prompts rows only
        rows = rows[: spec.eval.max_prompts]
    if not rows:
        return []
    field = spec.dataset.prompt_field
    counts = _token_counts(tokenizer, [_prompt_text(row, field) for _, row in rows])
    longest = max(range(len(counts)), key=counts.__getitem__)  # the first of the longest
    tokens, line, new = counts[longest], rows[longest][0], spec.sampling.max_new_tokens
    where = f"line {line} of file {file.id} (dataset.{attr})"
    if tokens >= limit.tokens:  # no room for even one new token: only shorter prompts help
        return [
            _problem(
                f"dataset.{attr}",
                f"the prompt on {where} is {tokens} tokens, which "
                f"leaves no room for a completion within {limit}; "
                f"{limit.remedies('shorten the prompts')}",
            )
        ]
    if tokens + new <= limit.tokens:
        return []
    return [
        _problem(
            "sampling.max_new_tokens",
            f"the longest prompt, on {where}, is {tokens} "
            f"tokens; with max_new_tokens {new} a sequence reaches {tokens + new} "
            f"tokens, more than {limit}; "
            + limit.remedies(
                f"lower sampling.max_new_tokens to at most {limit.tokens - tokens}",
                "shorten the prompts",
            ),
        )
    ]


def _group_problems(
    rows: list[tuple[int, dict]],
    spec: RunSpec,
    tokenizer: Tokenizer,
    limit: _Limit,
    where: Callable[[int], tuple[str, str]],
) -> list[dict]:
    """The longest off-policy group sequence against the limit: its prompt and its longest
    completion with the EOS the learner appends (workers/offpolicy.py), or, for a group of
    fewer than k that the run tops up with its own samples, max_new_tokens if that is more.
    `rows` are (number, group); `where(number)` gives the field and the words for the group.
    Groups of served completions are left out: the run's own model made their ids, within its
    context."""
    rows = [(number, row) for number, row in rows if not is_traffic_group(row)]
    prompts = _token_counts(tokenizer, [_prompt_text(row, "prompt") for _, row in rows])
    flat = _token_counts(
        tokenizer, [c for _, row in rows for c in _completion_texts(row)], add_special_tokens=False
    )
    k, new = spec.algorithm.group_size, spec.sampling.max_new_tokens
    worst, start = (0, 0, 0, 0, 0), 0  # (total, line, prompt, completion, topped up)
    for (line, row), prompt in zip(rows, prompts, strict=True):
        n = group_size(row)
        completion = max(flat[start : start + n], default=0) + 1  # + EOS
        start += n
        topped = k - n if n < k and new > completion else 0
        if (total := prompt + (new if topped else completion)) > worst[0]:
            worst = (total, line, prompt, completion, topped)
    total, line, prompt, completion, topped = worst
    if total <= limit.tokens:
        return []
    if topped:
        longest = (
            f"{topped} completion{'s' * (topped > 1)} the run samples to top the group "
            f"up, of up to max_new_tokens ({new})"
        )
        room = limit.tokens - prompt
        ways = [f"lower sampling.max_new_tokens to at most {room}"] if room > 0 else []
        ways += [f"give that group all {k} completions", "leave it out"]
    else:
        longest = f"a completion of {completion} with the EOS the learner appends"
        ways = ["shorten that group's completions or prompt", "leave it out"]
    field, group = where(line)
    return [
        _problem(
            field,
            f"{group} needs {total} tokens, more than {limit}: a prompt of "
            f"{prompt} and {longest}; {limit.remedies(*ways)}",
        )
    ]


# What a chat template adds to a conversation's text, at most, as far as completion_room
# reckons: a header and a footer, and a role marker around each message.
TEMPLATE_TOKENS = 64
TEMPLATE_TOKENS_PER_MESSAGE = 8


def completion_room(
    settings: Settings, session: Session, project: Project, spec: RunSpec, shown: dict[str, str]
) -> dict[str, int] | None:
    """For each of the spec's train and eval files (dataset.<attr>), the new tokens its longest
    prompt leaves room for within the run's token limit, a chat template's own tokens reckoned
    in; None when the API cannot tell (it does not see the model, or reads no tokenizer of it).
    `spec` and `shown` as for check_model."""
    if (seen := _seen_model(settings, spec, shown)) is None:
        return None
    config, tokenizer = seen
    if (limit := _limit(spec, context_length(config))) is None or tokenizer is None:
        return None
    room = {}
    for attr in ("train_file", "eval_file"):
        if (file_id := getattr(spec.dataset, attr)) is None:
            continue
        rows = [row for _, row in numbered_rows(get_file(session, project, file_id).path)]
        texts = [_prompt_text(row, spec.dataset.prompt_field) for row in rows]
        longest = max(
            count
            + (TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE * len(row["messages"])) * is_chat(row)
            for count, row in zip(_token_counts(tokenizer, texts), rows, strict=True)
        )
        room[attr] = limit.tokens - longest
    return room
