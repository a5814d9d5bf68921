"""Where a worker loads a run's model from.

The API authorised the run's model folders at submission and keeps them apart from the spec
(runs.model_source; the rules are service/contract/sources.py's). The worker checks them again
before it reads a byte, with its own view of the file system: a run recorded under older rules,
or a symbolic link made since, gets no further. A folder passes when it is a registered base
model's, one of the project's own checkpoints, or under this worker's model roots outside its
data directory; a hub id is fetched into the hub's cache and loaded from there, never read as a
folder relative to this process.
"""

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gvpo_client.paths import SOURCE_FIELDS, is_hub_id, is_local
from service.config import Settings
from service.contract.sources import refusal, under_roots
from service.contract.spec import RunSpec
from service.db import session_scope
from service.models import Checkpoint, RegisteredModel, Run
from workers.errors import RunError

# What a hub model's folder needs (weights in one format: safetensors, else PyTorch's).
HUB_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def loaded_spec(settings: Settings, run_id: str, spec: dict[str, Any]) -> RunSpec:
    """The run's spec with the folders its model loads from; RunError when one of them is not
    this project's to load (pydantic's ValidationError for a spec today's rules refuse)."""
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        source = run.model_folders
        for name in SOURCE_FIELDS:
            if (value := source.get(name)) and not _allowed(settings, session, run, value):
                raise RunError(f"run refused: {refusal(f'model.{name}')}")
    return RunSpec.model_validate({**spec, "model": {**spec["model"], **source}})


def _allowed(settings: Settings, session: Session, run: Run, value: str) -> bool:
    registered = select(RegisteredModel.name).where(RegisteredModel.path == value)
    own_checkpoint = (
        select(Checkpoint.id)
        .join(Run, Run.id == Checkpoint.run_id)
        .where(Checkpoint.path == value, Run.project_id == run.project_id)
    )
    if session.scalar(registered.limit(1)) or session.scalar(own_checkpoint.limit(1)):
        return True
    if is_local(value):
        return under_roots(value, settings.resolved_model_roots, settings.resolved_data_dir)
    return is_hub_id(value)


def fetch_hub_models(spec: RunSpec) -> RunSpec:
    """The spec with each hub id of its model replaced by the id's folder in the hub's cache
    (downloaded when missing and the hub is reachable)."""
    local = {}
    for name in SOURCE_FIELDS:
        if (value := getattr(spec.model, name)) and (folder := loadable(value)) != value:
            local[name] = folder
    if not local:
        return spec
    return spec.model_copy(update={"model": spec.model.model_copy(update=local)})


def loadable(value: str) -> str:
    """What to hand from_pretrained for an authorised model source: a hub id's folder in the
    hub's cache, anything else as it is."""
    return value if is_local(value) or not is_hub_id(value) else _hub_folder(value)


def _hub_folder(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=[*HUB_FILES, "*.safetensors"])
        if not any(Path(folder).glob("*.safetensors")):
            folder = snapshot_download(repo_id, allow_patterns=[*HUB_FILES, "*.bin"])
    except Exception as exc:  # offline with no cached copy, no such repo, a network error
        raise RunError(
            f"cannot fetch model {repo_id!r} from the hub: {type(exc).__name__}: {exc}"
        ) from None
    return folder
