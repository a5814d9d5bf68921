"""An inference worker (`gvpo serve`): holds models in vLLM servers and tells the API so.

It runs a small control server, for the API only (the serve token): `POST /models` makes sure a
model is served at a version (loading, reloading or restarting it; the answer is the vLLM
server's address), `GET /models` lists what it holds, `DELETE /models/{name}` unloads one. Every
serve_heartbeat_s it writes its row in `inference_workers` (its address and models); the API
routes requests by those rows and treats a row older than serve_stale_s as a worker gone. On
SIGTERM it removes its row and stops its servers.
"""

import logging
import os
import secrets
import socket
import threading
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse
from sqlalchemy import delete

from service.config import Settings
from service.contract.serving import EnsureModel
from service.db import session_scope
from service.models import InferenceWorker
from service.models.base import upsert, utcnow
from workers.serving.pool import GIB, DoesNotFit, ModelFilesMissing, ModelPool
from workers.serving.vllm_server import ServerFailed, ServerOptions

log = logging.getLogger(__name__)


def _gpu_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def _device_options(settings: Settings, token: str, gpu_bytes: int | None) -> ServerOptions:
    return ServerOptions(
        kv_cache_bytes=int(settings.serve_kv_cache_gib * GIB),
        gpu_bytes=gpu_bytes,
        token=token,
        host=settings.serve_host,
        public_host=_url_host(settings.serve_public_host or settings.serve_host),
        log_dir=settings.resolved_data_dir / "serving" / "logs",
    )


class InferenceWorkerProcess:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        gpu_bytes = _gpu_bytes()
        budget = int(settings.serve_memory_gib * GIB)
        if gpu_bytes is not None:  # on a GPU, the models' weights and caches are in its memory
            budget = min(budget, int(gpu_bytes * settings.serve_gpu_memory_utilization))
        self.pool = ModelPool(
            budget,
            _device_options(settings, settings.serve_token, gpu_bytes),
            settings.resolved_data_dir / "serving" / "cache",
            settings.serve_load_timeout_s,
        )
        self.url = ""
        self.stopped = threading.Event()

    def app(self) -> FastAPI:
        token = self.settings.serve_token

        def authorised(authorization: Annotated[str | None, Header()] = None) -> None:
            if not authorization or not secrets.compare_digest(
                authorization.encode(), f"Bearer {token}".encode()
            ):
                raise HTTPException(401, "this is an inference worker's control server")

        @asynccontextmanager
        async def lifespan(_: FastAPI):
            yield
            # uvicorn re-raises SIGTERM once it has shut down, so the worker's cleanup runs
            # here, before that, not after run() returns
            self.stopped.set()
            self.pool.close()
            self._forget()

        app = FastAPI(
            title="gvpo inference worker", dependencies=[Depends(authorised)], lifespan=lifespan
        )

        @app.get("/models")
        def models() -> dict:
            return {"worker": self.id, "models": self.pool.models()}

        @app.post("/models")
        def ensure(body: EnsureModel) -> JSONResponse:
            try:
                held = self.pool.ensure(body.model, body.path, body.version)
            except ModelFilesMissing as exc:
                return _problem(410, "model_files_gone", str(exc))
            except DoesNotFit as exc:
                return _problem(503, "no_room", str(exc))
            except ServerFailed as exc:
                return _problem(502, "model_failed", str(exc))
            finally:
                self.report()
            return JSONResponse(held)

        @app.delete("/models/{name}")
        def unload(name: str) -> dict:
            unloaded = self.pool.unload(name)
            self.report()
            return {"unloaded": unloaded}

        return app

    def report(self) -> None:
        """Write this worker's row: where it is, what it holds."""
        now = utcnow()
        row = {
            "id": self.id,
            "url": self.url,
            "models": self.pool.models(),
            "memory_bytes": self.pool.budget,
            "started_at": now,
            "heartbeat_at": now,
        }
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                upsert(session, InferenceWorker, [row], ["id"], ["url", "models", "heartbeat_at"])
        except Exception:  # the database is down: the next beat tries again
            log.exception("inference worker %s could not report", self.id)

    def _beat(self) -> None:
        while not self.stopped.wait(self.settings.serve_heartbeat_s):
            self.report()

    def _forget(self) -> None:
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                session.execute(delete(InferenceWorker).where(InferenceWorker.id == self.id))
                stale = utcnow() - timedelta(seconds=10 * self.settings.serve_stale_s)
                session.execute(delete(InferenceWorker).where(InferenceWorker.heartbeat_at < stale))
        except Exception:
            log.exception("inference worker %s could not remove its row", self.id)

    def run(self) -> None:
        s = self.settings
        family = socket.AF_INET6 if ":" in s.serve_host else socket.AF_INET
        sock = socket.create_server((s.serve_host, s.serve_port), family=family, backlog=2048)
        host = _url_host(s.serve_public_host or s.serve_host)
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        self.report()
        beat = threading.Thread(target=self._beat, name="serve-heartbeat", daemon=True)
        beat.start()
        log.info("inference worker %s serving at %s", self.id, self.url)
        config = uvicorn.Config(self.app(), log_level="warning", access_log=False)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:  # when the server failed before its shutdown ran; a second close is a no-op
            self.stopped.set()
            self.pool.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _problem(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def run_inference_worker(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    InferenceWorkerProcess(settings).run()
