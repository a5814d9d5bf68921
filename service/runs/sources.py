"""A run's model, authorised and resolved: what the tenant's spec names (the rules are
service/contract/sources.py's) turned into the folders a worker loads, which the run keeps in
runs.model_source and never shows the tenant."""

import os
from dataclasses import dataclass, field

from pydantic import ValidationError
from sqlalchemy.orm import Session

from gvpo_client.paths import SOURCE_FIELDS, is_hub_id, is_local, is_relative
from service.config import Settings
from service.contract import storage
from service.contract.sources import refusal, relative_refusal, under_roots
from service.contract.spec import RunSpec
from service.contract.states import TERMINAL
from service.contract.storage import CheckpointKind
from service.errors import InvalidSpec, invalid_spec
from service.models import Checkpoint, Project, RegisteredModel, Run


@dataclass(frozen=True)
class Resolved:
    """The spec twice: `spec` with the model's folders filled in (what the checks and the
    worker use), `public` as the tenant wrote it (a LoRA checkpoint's model.lora filled in);
    `source` the folders (runs.model_source), `shown` how messages name each of them."""

    spec: RunSpec
    public: RunSpec
    source: dict[str, str | None]
    shown: dict[str, str] = field(default_factory=dict)


def _problem(name: str, message: str) -> dict[str, str]:
    return {"field": f"model.{name}", "message": message}


def _authorised(session: Session, settings: Settings, value: str) -> str | None:
    """The folder (or hub id) `value` stands for, when the tenant may name it; else None."""
    if (registered := session.get(RegisteredModel, value)) is not None:
        return registered.path
    if is_local(value):
        if under_roots(value, settings.resolved_model_roots, settings.resolved_data_dir):
            return os.path.abspath(os.path.expanduser(value))
        return None
    return value if is_hub_id(value) else None


def resolve_model(
    session: Session, settings: Settings, project: Project, spec: RunSpec
) -> Resolved:
    """InvalidSpec for a model the project may not load, the same for any path it names,
    whether or not it exists; a relative path is refused for being one, before any look."""
    if spec.model.checkpoint is not None:
        return _from_checkpoint(session, project, spec)
    source, bad = {}, []
    for name in SOURCE_FIELDS:
        value = getattr(spec.model, name)
        if value is not None and is_relative(value):
            bad.append(_problem(name, relative_refusal(f"model.{name}")))
            continue
        source[name] = value and _authorised(session, settings, value)
        if value is not None and source[name] is None:
            bad.append(_problem(name, refusal(f"model.{name}")))
    if bad:
        raise InvalidSpec(bad)
    shown = {name: repr(getattr(spec.model, name)) for name in SOURCE_FIELDS}
    return Resolved(_filled(spec, source), spec, source, shown)


def _filled(spec: RunSpec, update: dict) -> RunSpec:
    """`spec` with model fields replaced, validated again (a rule the filled-in model breaks,
    LoRA with fsdp say, is the submitter's to fix). Only what the submitter set is carried
    over, so a default that depends on the model (the reference with an adapter) follows it."""
    try:
        return RunSpec.model_validate(
            {
                **spec.model_dump(exclude_unset=True),
                "model": {**spec.model.model_dump(), **update},
                "webhook_secret": spec.webhook_secret,
            }
        )
    except ValidationError as exc:
        raise invalid_spec(exc.errors(), spec.model_dump()) from None


def _from_checkpoint(session: Session, project: Project, spec: RunSpec) -> Resolved:
    """model.checkpoint: a whole model's folder, or a LoRA adapter over its run's model with
    its run's model.lora. The checkpoint's run must have ended, or its keep_last could delete
    it."""
    model, ckpt_id = spec.model, spec.model.checkpoint
    ckpt = session.get(Checkpoint, ckpt_id)
    trained = ckpt and session.get(Run, ckpt.run_id)
    if trained is None or trained.project_id != project.id:
        raise InvalidSpec([_problem("checkpoint", f"no checkpoint {ckpt_id!r} in this project")])
    bad = [
        _problem(name, "leave it out with model.checkpoint, which sets it")
        for name in SOURCE_FIELDS
        if getattr(model, name) is not None
    ]
    if trained.status not in TERMINAL:
        bad.append(
            _problem(
                "checkpoint",
                f"checkpoint {ckpt.id} belongs to run {trained.id}, which is "
                f"{trained.status}: its keep_last may still delete it; start from it once "
                "that run has ended",
            )
        )
    elif not storage.exists(ckpt.path):
        bad.append(_problem("checkpoint", f"checkpoint {ckpt.id} has no files left"))
    source = {"path": ckpt.path, "adapter": None}
    shown = {"path": f"checkpoint {ckpt.id}"}
    public = spec
    if ckpt.kind == CheckpointKind.LORA_ADAPTER:
        lora = RunSpec.model_validate(trained.spec).model.lora
        source = {"path": trained.model_folders["path"], "adapter": ckpt.path}
        shown = {"path": f"the base model of checkpoint {ckpt.id}", "adapter": shown["path"]}
        if "lora" in model.model_fields_set and model.lora != lora:
            bad.append(
                _problem(
                    "lora",
                    f"checkpoint {ckpt.id} is a LoRA adapter, trained on with its own "
                    "settings: leave model.lora out",
                )
            )
        public = _filled(spec, {"lora": lora})
    if bad:
        raise InvalidSpec(bad)
    resolved = _filled(public, source)
    # The run's own spec keeps the settings its folders decided (the reference over an adapter)
    public = public.model_copy(update={"algorithm": resolved.algorithm})
    return Resolved(resolved, public, source, shown)


def loaded_spec(spec: RunSpec, run: Run) -> RunSpec:
    """A run's validated spec with the folders its worker loads filled in."""
    return spec.model_copy(update={"model": spec.model.model_copy(update=run.model_folders)})
