"""Base models the operator registers (`gvpo models add NAME PATH`): every project's runs may
name them in model.path and never see the folders they stand for."""

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import Settings
from service.contract.sources import canonical, inside
from service.errors import BadRequest, NotFound
from service.models import RegisteredModel

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # no "/": an owner/name is a hub id


def register_model(session: Session, settings: Settings, name: str, path: str) -> RegisteredModel:
    """Register (or move) `name` to the model folder `path`, which must hold a config.json
    and lie outside the data directory."""
    if not NAME.fullmatch(name):
        raise BadRequest(
            f"model name {name!r}: use letters, digits, '.', '_' and '-' (at most 100, "
            "no '/', which would read as a hub id)"
        )
    folder = canonical(path)
    if inside(folder, canonical(settings.resolved_data_dir)):
        raise BadRequest(
            f"{folder} is inside the data directory, where every project's uploads and "
            "checkpoints live: copy the model out of it first"
        )
    if not (folder / "config.json").is_file():
        raise BadRequest(f"{folder} has no config.json: give a model folder (save_pretrained)")
    model = session.get(RegisteredModel, name) or RegisteredModel(name=name)
    model.path = str(folder)
    session.add(model)
    session.flush()
    return model


def list_models(session: Session) -> list[RegisteredModel]:
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)))


def remove_model(session: Session, name: str) -> None:
    """Runs already submitted with it keep loading it; new ones cannot name it."""
    if (model := session.get(RegisteredModel, name)) is None:
        raise NotFound(f"no registered model {name!r}")
    session.delete(model)
