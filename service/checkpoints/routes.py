from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, Query
from fastapi.responses import FileResponse

from service.checkpoints import service
from service.checkpoints.schemas import CheckpointList, CheckpointRead
from service.deps import ProjectDep, SessionDep

router = APIRouter(prefix="/v1/runs", tags=["checkpoints"])


@router.get("/{run_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(run_id: str, session: SessionDep, project: ProjectDep) -> CheckpointList:
    rows = service.list_checkpoints(session, project, run_id)
    return CheckpointList(data=[CheckpointRead.model_validate(c) for c in rows])


@router.get("/{run_id}/checkpoints/{ckpt_id}/download", response_class=FileResponse)
def download_checkpoint(
    run_id: str, ckpt_id: str, session: SessionDep, project: ProjectDep, cleanup: BackgroundTasks,
    format: Annotated[Literal["stored", "merged"], Query(
        description="stored: the folder as saved (a PEFT adapter for LoRA runs); merged: a whole "
                    "model with the adapter merged in")] = "stored",
) -> FileResponse:
    """The checkpoint as a .tar.gz (safetensors weights or adapter, tokenizer, optimizer state)."""
    ckpt = service.get_checkpoint(session, project, run_id, ckpt_id)
    archive = service.pack_checkpoint(ckpt, merged=format == "merged")
    cleanup.add_task(archive.unlink, missing_ok=True)
    return FileResponse(archive, media_type="application/gzip", filename=f"{ckpt_id}.tar.gz")
