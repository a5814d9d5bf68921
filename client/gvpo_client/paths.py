"""How a run spec's model sources are written, as the client and the service both read them: a
folder (absolute, or relative to where it is read), a hub id, or a bare name. The service's
rules of which sources a run may use (service/contract/sources.py) build on these forms; the
client uses them to send a relative folder as the absolute one the user means."""

import os
import re
from pathlib import Path
from typing import Any

LOCAL_PREFIXES = ("/", "./", "../", "~")  # a local folder, as the tenant writes it
DOTS = (".", "..")
# Hugging Face repo ids: a name, or an owner and a name (their own validator's alphabet).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
SOURCE_FIELDS = ("path", "adapter")  # the fields of model that name weights


def is_hub_id(value: str) -> bool:
    return bool(HUB_ID.fullmatch(value)) and ".." not in value and not value.endswith(".")


def is_local(value: str) -> bool:
    """A folder, absolute or relative: a local prefix, or a `/` no hub id or URL has (`tiny/`,
    `a/b/c`). `org/name` stays a hub id."""
    if value.startswith(LOCAL_PREFIXES) or value in DOTS:
        return True
    return "/" in value and "://" not in value and not is_hub_id(value)


def is_relative(value: str) -> bool:
    """A folder named relative to where it is read: a current directory, or `~`'s home."""
    return is_local(value) and not value.startswith("/")


def with_absolute_paths(spec: dict[str, Any], cwd: str | Path | None = None) -> dict[str, Any]:
    """`spec` (a run spec as sent, unvalidated) with each relative folder among its model's
    sources made absolute against `cwd` (default: the current directory), `~` expanded; all
    else as it is, for the API to judge."""
    model = spec.get("model")
    if not isinstance(model, dict):
        return spec
    here = Path.cwd() if cwd is None else Path(cwd)
    absolute = {
        name: os.path.normpath(here / os.path.expanduser(value))
        for name in SOURCE_FIELDS
        if isinstance(value := model.get(name), str) and is_relative(value)
    }
    return {**spec, "model": {**model, **absolute}} if absolute else spec
