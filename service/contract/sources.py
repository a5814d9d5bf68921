"""Where a run may load weights from: the API's submission check and the worker's check before
it loads anything apply these same rules.

A run's model.path and model.adapter, as a tenant writes them, are each one of:

- the name of a base model the operator registered (`gvpo models add NAME PATH`);
- a folder under one of the operator's model roots (GVPO_MODEL_ROOTS). The data directory is
  never one, even inside a root: every project's uploads and checkpoints live there;
- a hub id (`name` or `org/name`), which a worker fetches from the hub or its cache and never
  reads as a folder of the server's, so `runs/...` cannot name a folder relative to a worker.

model.checkpoint names one of the project's own checkpoints: the service finds its folder and
keeps it off the tenant's spec (runs.model_source), so no tenant sees a server path.

A refusal says the same for a path that exists and one that does not.
"""

import os
import re
from collections.abc import Iterable
from pathlib import Path

LOCAL_PREFIXES = ("/", "./", "../", "~")  # a local folder, as the tenant writes it
# Hugging Face repo ids: a name, or an owner and a name (their own validator's alphabet).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
SOURCE_FIELDS = ("path", "adapter")  # the fields of model that name weights


def is_local(value: str) -> bool:
    return value.startswith(LOCAL_PREFIXES)


def is_hub_id(value: str) -> bool:
    return bool(HUB_ID.fullmatch(value)) and ".." not in value and not value.endswith(".")


def canonical(value: str | Path) -> Path:
    """The folder `value` names, with `~`, `..` and symbolic links resolved (as far as they
    exist here): what a containment check must compare."""
    return Path(os.path.realpath(os.path.expanduser(value)))


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def under_roots(value: str, roots: Iterable[Path], data_dir: Path) -> bool:
    """A local folder under one of `roots` and outside the data directory."""
    try:
        path = canonical(value)
    except (OSError, ValueError, RuntimeError):  # a NUL, a ~user with no home
        return False
    if inside(path, canonical(data_dir)):
        return False
    return any(inside(path, canonical(root)) for root in roots)


def refusal(field: str) -> str:
    """One message for every source a tenant may not use, existing or not."""
    return (
        f"{field} must be the name of a base model registered with this service, a folder "
        "under its model roots (GVPO_MODEL_ROOTS; never its data directory), or a hub id "
        "(org/name); to start from one of this project's checkpoints, set model.checkpoint"
    )
