"""Our own models as judges: a `ckpt_…` or `run_…` of the grading project, served by the
inference workers (`gvpo serve`) as the API serves it (service/serving), by the same rules
(service/contract/serving.py): the same weights for the same id, the same worker chosen, the
same control request. The worker reads the rows itself; a LoRA checkpoint not merged yet is
merged here, in this worker, as a MERGE_TASK would.

`ServedJudge.post` is one chat completion at the model's vLLM server, with the serve token.
The route (which server, at which version) is found once per batch and again after the server
stopped answering; a model that has nothing to serve yet (a run before its first weights) or
no inference worker with room is a transient failure, retried as a network error is.
"""

import threading

import httpx
from pydantic import ValidationError

from service.config import Settings
from service.contract import storage
from service.contract.outbound import Answer, Transient, retry_after
from service.contract.serving import (
    EnsureModel,
    Held,
    Unservable,
    checkpoint_gone,
    run_weights,
    unknown,
    wants_asking,
)
from service.contract.spec import RunSpec
from service.contract.storage import CheckpointKind
from service.contract.tasks import MergeTask
from service.db import session_scope
from service.models import Checkpoint, Run
from service.models.checkpoint import newest_checkpoint
from service.models.run import mark_serving_asked
from workers.errors import RunError
from workers.merge import merge_checkpoint
from workers.serving.ask import ensure_served

CONNECT_S = 10.0


class JudgeFailed(RunError):
    """A judge that cannot answer at all: unreachable after every try, misconfigured (no key,
    refused URL, an unknown model). In a run it fails the run; in POST /v1/graders:run it is
    the answer's model_grader_server_error."""


def resolve(settings: Settings, project_id: str, name: str) -> EnsureModel:
    """What `name` serves for the project: the model, its folder and version. Unservable."""
    if name.startswith("ckpt_"):
        return _checkpoint(settings, project_id, name)
    if name.startswith("run_"):
        return _run(settings, project_id, name)
    raise unknown(name)


def _checkpoint(settings: Settings, project_id: str, name: str, served_as: str = "") -> EnsureModel:
    with session_scope(settings.resolved_database_url) as session:
        ckpt = session.get(Checkpoint, name)
        run = ckpt and session.get(Run, ckpt.run_id)
        if run is None or run.project_id != project_id:
            raise unknown(name)
        path, kind, step, run_id = ckpt.path, ckpt.kind, ckpt.step, run.id
    if not storage.exists(path):
        raise checkpoint_gone(name, run_id)
    if kind == CheckpointKind.LORA_ADAPTER:
        target = storage.merged_path(path)
        answer = merge_checkpoint(
            MergeTask(checkpoint_id=name, checkpoint_path=path, target=target)
        )
        if answer.problem is not None:
            raise Unservable("conflict", answer.problem.message)
        path = target
    return EnsureModel(model=served_as or name, path=path, version=step)


def _run(settings: Settings, project_id: str, name: str) -> EnsureModel:
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, name)
        if run is None or run.project_id != project_id:
            raise unknown(name)

        def publishing() -> bool:
            try:
                return RunSpec.model_validate(run.spec).serving.sync_every_steps > 0
            except ValidationError:
                raise Unservable(
                    "conflict", f"run {name}'s stored spec no longer passes today's rules"
                ) from None

        if wants_asking(run.status, run.serving_asked_at is not None, publishing):
            mark_serving_asked(session, run.id)
        newest = newest_checkpoint(session, run.id)
        weights = run_weights(
            name,
            run.status,
            publishing,
            run.weights_path,
            run.weights_step,
            newest and (newest.id, newest.step),
        )
    if weights.checkpoint is not None:
        return _checkpoint(settings, project_id, weights.checkpoint, served_as=name)
    return EnsureModel(model=name, path=weights.path, version=weights.step)


class ServedJudge:
    """Chat completions of one of the project's models, for one batch (a `with` block)."""

    def __init__(self, settings: Settings, project_id: str, model: str, timeout_s: float):
        self.settings, self.project_id, self.model = settings, project_id, model
        self.client = httpx.Client(
            headers={"Authorization": f"Bearer {settings.serve_token}"},
            timeout=httpx.Timeout(timeout_s, connect=CONNECT_S),
            limits=httpx.Limits(max_connections=None),
        )
        self.load_timeout = httpx.Timeout(settings.serve_load_timeout_s, connect=CONNECT_S)
        self.server: str | None = None  # the vLLM server's URL, once found
        self.lock = threading.Lock()

    def describe(self) -> str:
        return f"judge {self.model} (served here)"

    def __enter__(self) -> "ServedJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    def post(self, body: bytes) -> Answer:
        """One chat completion; Transient when it should be tried again, JudgeFailed when no
        try can help."""
        server = self._server()
        try:
            resp = self.client.post(
                f"{server}/v1/chat/completions",
                content=body,
                headers={"Content-Type": "application/json"},
            )
        except httpx.TransportError as exc:  # unloaded or restarted: find it again
            with self.lock:
                self.server = None if self.server == server else self.server
            raise Transient(f"{type(exc).__name__}: {exc}") from None
        return Answer(
            resp.status_code, resp.text, False, retry_after(resp.headers.get("Retry-After"))
        )

    def _server(self) -> str:
        with self.lock:  # one look-up for every thread of the batch
            if self.server is None:
                self.server = self._ensure()
            return self.server

    def _ensure(self) -> str:
        try:
            wanted = resolve(self.settings, self.project_id, self.model)
        except Unservable as exc:
            if exc.kind == "conflict":  # e.g. a run before its first weights: it may have some soon
                raise Transient(exc.message) from None
            raise JudgeFailed(f"{self.describe()}: {exc.message}") from None
        outcome = ensure_served(self.client, self.settings, wanted, self.load_timeout)
        if isinstance(outcome, Held):
            return outcome.url
        if outcome.kind != "no_room":  # its files are gone, or it does not load
            raise JudgeFailed(f"{self.describe()}: {outcome.message}")
        raise Transient(outcome.message)
