"""Where a run may load weights from: the API's submission check and the worker's check before
it loads anything apply these same rules.

A run's model.path and model.adapter, as a tenant writes them, are each one of:

- the name of a base model the operator registered (`gvpo models add NAME PATH`);
- a folder under one of the operator's model roots (GVPO_MODEL_ROOTS), as an absolute path. The
  data directory is never one, even inside a root: every project's uploads and checkpoints
  live there;
- a hub id (`name` or `org/name`), which a worker fetches from the hub or its cache and never
  reads as a folder of the server's, so `runs/...` cannot name a folder relative to a worker.

A bare name (`tiny`) is a registered model or a hub id, never a folder: `./tiny` is one. A path
relative to where it is read (`./tiny`, `../x`, `~/x`, `tiny/`, `a/b/c`) would be read against
the server's current or home directory, not the submitter's: the API refuses it, saying so, and
the CLI and the Python client make it absolute where the user submits
(gvpo_client.paths.with_absolute_paths).

model.checkpoint names one of the project's own checkpoints: the service finds its folder and
keeps it off the tenant's spec (runs.model_source), so no tenant sees a server path.

A refusal says the same for a path that exists and one that does not. The forms a source is
written in (a folder, relative or not; a hub id) are the client's too, which sends a relative
folder absolute: they are gvpo_client.paths.
"""

import os
from collections.abc import Iterable
from pathlib import Path


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


def relative_refusal(field: str) -> str:
    """Said of a relative folder, whether or not it exists: the string alone decides."""
    return (
        f"{field} must be an absolute path: a relative one (./, ../, ~, or a folder/ with a "
        "slash) would be resolved on the server, not where you are; the gvpo CLI makes it "
        "absolute for you (a bare name is a registered model or a hub id)"
    )


def refusal(field: str) -> str:
    """One message for every source a tenant may not use, existing or not."""
    return (
        f"{field} must be the name of a base model registered with this service, a folder "
        "under its model roots (GVPO_MODEL_ROOTS; never its data directory), or a hub id "
        "(org/name); to start from one of this project's checkpoints, set model.checkpoint"
    )
