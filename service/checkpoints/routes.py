from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, Depends, Query
from fastapi.responses import FileResponse

from service.auth.service import authenticate
from service.checkpoints import service
from service.checkpoints.schemas import CheckpointList, CheckpointRead, DownloadLink
from service.deps import AuthorizationHeader, PathId, ProjectDep, SessionDep, SettingsDep
from service.models import Project

router = APIRouter(prefix="/v1/runs", tags=["checkpoints"])

DownloadFormat = Annotated[
    Literal["stored", "merged"],
    Query(
        description="stored: the folder as saved (a PEFT adapter for LoRA runs); merged: a whole "
        "model with the adapter merged in"
    ),
]


def _key_or_token(
    run_id: PathId,
    ckpt_id: PathId,
    session: SessionDep,
    settings: SettingsDep,
    format: DownloadFormat = "stored",
    token: Annotated[
        str | None,
        Query(
            max_length=200,
            description="a signed link's token (POST .../download-url), in place of the API key",
        ),
    ] = None,
    authorization: AuthorizationHeader = None,
) -> Project:
    if token is None:
        return authenticate(session, authorization, settings.api_key_pepper)
    return service.authorize_download(session, settings, token, run_id, ckpt_id, format)


@router.get("/{run_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(run_id: PathId, session: SessionDep, project: ProjectDep) -> CheckpointList:
    rows = service.list_checkpoints(session, project, run_id)
    return CheckpointList(data=[CheckpointRead.model_validate(c) for c in rows])


@router.post("/{run_id}/checkpoints/{ckpt_id}/download-url", response_model=DownloadLink)
def download_url(
    run_id: PathId,
    ckpt_id: PathId,
    session: SessionDep,
    settings: SettingsDep,
    project: ProjectDep,
    format: DownloadFormat = "stored",
) -> DownloadLink:
    """A signed link to the download that needs no API key (for browsers), valid 10 minutes.
    The URL is relative to the API's origin."""
    url, expires_at = service.download_link(session, settings, project, run_id, ckpt_id, format)
    return DownloadLink(url=url, expires_at=expires_at)


@router.get("/{run_id}/checkpoints/{ckpt_id}/download", response_class=FileResponse)
def download_checkpoint(
    run_id: PathId,
    ckpt_id: PathId,
    session: SessionDep,
    settings: SettingsDep,
    cleanup: BackgroundTasks,
    project: Annotated[Project, Depends(_key_or_token)],
    format: DownloadFormat = "stored",
) -> FileResponse:
    """The checkpoint as a .tar.gz (safetensors weights or adapter, tokenizer, optimizer state).
    Authorised by the API key, or by the `token` of a signed link."""
    ckpt = service.get_checkpoint(session, project, run_id, ckpt_id)
    archive = service.pack_checkpoint(session, settings, ckpt, merged=format == "merged")
    cleanup.add_task(archive.unlink, missing_ok=True)
    return FileResponse(archive, media_type="application/gzip", filename=f"{ckpt_id}.tar.gz")
