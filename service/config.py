"""Settings: one pydantic-settings class, read from GVPO_* environment variables.

Everything defaults to the embedded single-machine stack under ``./.gvpo/`` (SQLite and a
file-backed Celery broker), so a fresh checkout runs with no external server.
"""

import hashlib
import hmac
import os
import secrets
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.contract.sealing import SETTING as ENCRYPTION_KEY_SETTING
from service.contract.sealing import Sealer, SealingError, sealer_for

MIN_SECRET_CHARS = 32


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GVPO_", extra="ignore")

    data_dir: Path = Path(".gvpo")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/gvpo.db"
    )
    broker_url: str = Field(
        default="filesystem://", description="Celery broker; filesystem:// is the embedded one"
    )
    result_backend: str | None = Field(
        default=None,
        description="Celery result backend for the requests a worker answers while the API "
        "waits (the loss dry-run, merged checkpoint downloads); default: the Redis "
        "broker itself, a folder beside the file broker, rpc:// for AMQP",
    )
    worker_answer_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="how long the API waits for a worker to answer such a request (504 after)",
    )
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str | None = Field(default=None, description="where clients reach the API")
    grpc_port: int = Field(
        default=50051,
        ge=0,
        le=65535,
        description="port of the gRPC API, served by every API process beside REST; 0 turns it off",
    )
    secret_key: str | None = Field(
        default=None,
        repr=False,
        description="signs short-lived download links; every API replica needs the same one. "
        "Default: a random key kept in <data_dir>/secret_key (embedded stack)",
    )
    api_key_pepper: str | None = Field(
        default=None,
        repr=False,
        description="server-side secret mixed into stored API-key hashes (HMAC); every API "
        "replica needs the same one",
    )
    encryption_key: str | None = Field(
        default=None,
        repr=False,
        description="encrypts the run webhook secrets stored in the database; the API, every "
        "worker and the migrations need the same one. Several, comma-separated, newest first, "
        "while the key is rotated (`gvpo db reencrypt` then moves every secret to the first). "
        "Default: a random key kept in <data_dir>/encryption_key (embedded stack only)",
    )
    api_key: str | None = None
    checkpoint_url: str | None = Field(
        default=None,
        description="an fsspec URL (e.g. s3://bucket/prefix, gs://bucket/prefix, "
        "file:///mnt/ckpts) where checkpoints are kept, under <url>/<run>/step_NNNNNN; "
        "credentials come from the store's own environment (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3). Unset: the data dir",
    )
    max_upload_bytes: int = 512 * 1024 * 1024
    max_request_bytes: int = Field(
        default=64 * 1024 * 1024,
        description="largest body of any other request (a run spec, posted groups); 413 above, "
        "refused from Content-Length before it is read",
    )
    max_callback_bytes: int = Field(
        default=16 * 1024 * 1024, description="largest reward callback body accepted (413 above)"
    )
    model_path_check: Literal["auto", "strict", "off"] = Field(
        default="auto",
        description="submission-time checks of model.path (config.json, tokenizer, context "
        "length, prompt + max_new_tokens budgets) when it is a directory the API "
        "can see. auto: a local path (/, ./, ../, ~) the API cannot see is refused "
        "on the embedded stack (the worker shares its machine) and left to the "
        "worker in a cluster, as is a hub id; strict: such a path is always refused "
        "(the API mounts the workers' model volume); off: no model checks",
    )
    model_roots: str | None = Field(
        default=None,
        description="folders (separated by ':') under which a run's model.path or model.adapter "
        "may name a model; the data directory is never one. Unset: on the embedded stack, "
        "the directory it was started in, your home directory and the system temp directory; "
        "in a cluster, none (registered base models, hub ids and the project's own "
        "checkpoints only)",
    )
    metrics_token: str | None = Field(
        default=None,
        repr=False,
        description="the bearer token Prometheus sends to GET /metrics; unset, only clients "
        "on this machine (loopback) may read it",
    )
    worker_queues: str = "default,gpu,cpu"
    torch_threads: int = Field(
        default=1, description="intra-op threads in the worker; 1 is fastest for small CPU models"
    )
    rollout_threads: int | None = Field(
        default=None,
        ge=1,
        description="intra-op threads of an async run's rollout thread (training.max_lag > 0), "
        "which samples while the learner trains with torch_threads; default torch_threads",
    )
    webhook_allow_private: bool = Field(
        default=False, description="let reward webhooks call loopback/private addresses"
    )
    webhook_max_response_bytes: int = 1024 * 1024
    webhook_secret_grace_s: int = Field(
        default=3600, description="how long a rotated-out secret still verifies callbacks"
    )
    node_address: str | None = Field(
        default=None,
        description="the address other workers reach this worker's machine at, for the "
        "rendezvous of runs spanning several machines (resources.nodes); default the address "
        "its host name resolves to (a container's or pod's IP; set it where that is loopback)",
    )
    gang_join_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="how long a run spanning several machines waits for its gang of workers "
        "to gather before it goes back to the queue",
    )
    gang_retries: int = Field(
        default=3,
        ge=1,
        description="times in a row a multi-machine run's gang may break up or fail to gather "
        "without a new checkpoint before the run fails",
    )
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    db_retry_s: float = Field(
        default=300.0,
        ge=0,
        description="how long a worker waits out a database outage before failing the run",
    )
    reaper_interval_s: float = Field(
        default=15.0,
        ge=0,
        description="how often each API process requeues runs with an expired lease and publishes "
        "runs the broker missed; 0 turns the reaper off",
    )
    schedule_interval_s: float = Field(
        default=2.0,
        ge=0,
        description="how often each API process lets through the queued runs that projects' "
        "quotas held back and pauses runs whose project spent its GPU-hour budget; 0 turns it "
        "off (runs are then let through only when submitted or resumed)",
    )
    quota_max_concurrent_runs: int | None = Field(
        default=None,
        ge=1,
        description="runs a project may have started or on their way to a worker at once, "
        "unless `gvpo quota set` gave the project its own; unset = no limit",
    )
    quota_max_gpus: int | None = Field(
        default=None,
        ge=1,
        description="devices (resources.gpus, or training processes) a project's started runs "
        "may hold at once, unless the project has its own; unset = no limit",
    )
    quota_gpu_hours: float | None = Field(
        default=None,
        ge=0,
        description="device-hours a project may spend in all (GPU-hours; process-hours on CPU "
        "workers), unless the project has its own; unset = no limit",
    )
    notify_interval_s: float = Field(
        default=2.0,
        ge=0,
        description="how often each API process sends due run notifications (notify_url); "
        "0 turns the notifier off",
    )
    notify_timeout_s: float = Field(
        default=10.0, gt=0, description="time limit of one notification POST"
    )
    notify_max_attempts: int = Field(
        default=8, ge=1, description="tries per notification before it is given up"
    )
    notify_backoff_s: float = Field(
        default=1.0,
        ge=0,
        description="first retry delay of a notification; it doubles per try, up to 5 minutes",
    )
    serve_host: str = Field(
        default="127.0.0.1",
        description="the address an inference worker (gvpo serve) listens on and gives the API: "
        "its control server and the vLLM servers of the models it holds",
    )
    serve_public_host: str | None = Field(
        default=None,
        description="the name the API reaches an inference worker by, when not serve_host (in "
        "compose: the service's name, while it listens on 0.0.0.0)",
    )
    serve_port: int = Field(
        default=0, ge=0, le=65535, description="an inference worker's control port; 0: any free"
    )
    serve_memory_gib: float = Field(
        default=8.0,
        gt=0,
        description="memory an inference worker's models may take together (weights, KV cache "
        "and server each; on a GPU at most serve_gpu_memory_utilization of its memory); past it "
        "the least recently used model is unloaded",
    )
    serve_kv_cache_gib: float = Field(
        default=1.0, gt=0, description="KV cache of each model an inference worker holds"
    )
    serve_gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="the share of a GPU an inference worker's vLLM servers may take together "
        "(each takes its model's part)",
    )
    serve_load_timeout_s: float = Field(
        default=600.0, gt=0, description="how long loading a model on an inference worker may take"
    )
    serve_heartbeat_s: float = Field(
        default=2.0, gt=0, description="how often an inference worker reports what it holds"
    )
    serve_stale_s: float = Field(
        default=15.0,
        gt=0,
        description="an inference worker that has not reported for this long is gone",
    )
    serve_in_stack: bool = Field(
        default=True, description="the embedded stack (gvpo up) runs an inference worker"
    )

    @property
    def embedded(self) -> bool:
        """The single-machine stack: SQLite and the file-backed broker."""
        return self.resolved_database_url.startswith("sqlite") and self.broker_url.startswith(
            "filesystem://"
        )

    def unsafe_secrets(self) -> list[str]:
        """What makes these settings unfit to serve a cluster: secrets left to their embedded
        defaults. Empty on the embedded stack, where the defaults are fine."""
        if self.embedded:
            return []
        too_short = f"shorter than {MIN_SECRET_CHARS} characters"
        keys = self._encryption_keys()
        return [
            f"{name} is {too_short if value else 'not set'}: {why}. Set it to a random "
            f"value (e.g. `openssl rand -hex 32`), the same on every {where}"
            for name, value, why, where in (
                (
                    "GVPO_SECRET_KEY",
                    self.secret_key,
                    "it signs checkpoint download links",
                    "API replica",
                ),
                (
                    "GVPO_API_KEY_PEPPER",
                    self.api_key_pepper,
                    "it keys the stored API-key hashes",
                    "API replica",
                ),
                (
                    ENCRYPTION_KEY_SETTING,
                    min(keys, key=len) if keys else None,  # each listed key counts
                    "it encrypts the webhook secrets stored in the database",
                    "API replica and worker",
                ),
            )
            if not value or len(value) < MIN_SECRET_CHARS
        ]

    def _encryption_keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in (self.encryption_key or "").split(",") if k.strip())

    @property
    def sealer(self) -> Sealer:
        """Encrypts and decrypts the stored webhook secrets (service/contract/sealing.py).
        Without GVPO_ENCRYPTION_KEY the embedded stack keeps a random key in its data dir; a
        cluster has no such default (each replica and worker would make its own), so there
        it is an error, never plain text."""
        if keys := self._encryption_keys():
            return sealer_for(keys)
        if not self.embedded:
            raise SealingError(
                f"{ENCRYPTION_KEY_SETTING} is not set: outside the embedded stack the webhook "
                "secrets stored in the database are encrypted with it. Set it to a random value "
                "(e.g. `openssl rand -hex 32`), the same for the API, every worker and "
                "`gvpo db upgrade`"
            )
        return sealer_for((self._kept_key("encryption_key").decode(),))

    @property
    def serve_token(self) -> str:
        """The bearer token between the API and inference workers (their control servers and
        vLLM servers), derived from the secret key they share."""
        digest = hmac.new(self.resolved_secret_key, b"gvpo-serve", hashlib.sha256)
        return digest.hexdigest()

    @property
    def resolved_secret_key(self) -> bytes:
        if self.secret_key:
            return self.secret_key.encode()
        return self._kept_key("secret_key")

    def _kept_key(self, name: str) -> bytes:
        """A random key made once and kept in <data_dir>/<name> (the embedded stack's default);
        read once per process (the embedded API opens a webhook secret with it per callback)."""
        path = self.resolved_data_dir / name
        if (kept := _KEPT.get(path)) is not None:
            return kept
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # A temporary file of its own (made 0600) for each caller, then a link, which is
            # atomic: the processes and the request threads that start together all keep the
            # first key written.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.")
            try:
                with os.fdopen(fd, "w") as out:
                    out.write(secrets.token_hex(32))
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        _KEPT[path] = kept = path.read_text().strip().encode()
        return kept

    @property
    def resolved_model_roots(self) -> list[Path]:
        if self.model_roots is not None:
            return [Path(p).expanduser() for p in self.model_roots.split(os.pathsep) if p]
        if not self.embedded:
            return []
        return [Path.cwd(), Path.home(), Path(tempfile.gettempdir())]

    @property
    def resolved_data_dir(self) -> Path:
        return _resolved(self.data_dir, os.getcwd())

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'gvpo.db'}"

    @property
    def resolved_api_url(self) -> str:
        return (self.api_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")

    @property
    def files_dir(self) -> Path:
        return self.resolved_data_dir / "files"

    @property
    def runs_dir(self) -> Path:
        return self.resolved_data_dir / "runs"

    @property
    def broker_dir(self) -> Path:
        return self.resolved_data_dir / "broker"


_KEPT: dict[Path, bytes] = {}  # the kept keys read so far, by path


@lru_cache(maxsize=64)
def _resolved(path: Path, cwd: str) -> Path:
    """`path` made absolute (from `cwd`), with links resolved: once per path, not on every use
    (the embedded database's URL is made from it on every request)."""
    return (Path(cwd) / path.expanduser()).resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
