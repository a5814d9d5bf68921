from typing import Annotated

from fastapi import APIRouter, Form, UploadFile
from fastapi.responses import FileResponse

from service.contract.files import FilePurpose
from service.deps import PathId, ProjectDep, SessionDep, SettingsDep
from service.files import service
from service.files.schemas import FileList, FileRead

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", status_code=201, response_model=FileRead)
def upload_file(
    file: UploadFile,
    session: SessionDep,
    project: ProjectDep,
    settings: SettingsDep,
    # Documented as the purposes; the service names a wrong one in its 400.
    purpose: Annotated[str, Form(json_schema_extra={"enum": list(FilePurpose)})] = "train",
) -> FileRead:
    row = service.create_file(session, settings, project, file.file, file.filename, purpose)
    return FileRead.model_validate(row)


@router.get("", response_model=FileList)
def list_files(session: SessionDep, project: ProjectDep) -> FileList:
    return FileList(data=[FileRead.model_validate(f) for f in service.list_files(session, project)])


@router.get("/{file_id}", response_model=FileRead)
def get_file(file_id: PathId, session: SessionDep, project: ProjectDep) -> FileRead:
    return FileRead.model_validate(service.get_file(session, project, file_id))


@router.get(
    "/{file_id}/content",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/jsonl": {}},
            "description": "the file's JSONL, as uploaded or made",
        }
    },
)
def file_content(file_id: PathId, session: SessionDep, project: ProjectDep) -> FileResponse:
    """The file's rows: an upload as it was sent, or one the service made (a rescore's)."""
    file = service.get_file(session, project, file_id)
    return FileResponse(file.path, media_type="application/jsonl", filename=file.filename)
