"""MLflow: the run's metrics, spec and checkpoints on an MLflow tracking server, over its REST
API (/api/2.0/mlflow, and /api/2.0/mlflow-artifacts for artifacts the server stores itself,
`mlflow server`'s default since MLflow 2).

The URL is one a request named, so the worker calls it as it calls reward webhooks: through
an OutboundClient (each request's host resolved once and checked, no redirects, no proxy),
which the mlflow library could not do; and a dead server costs a few seconds (ATTEMPTS tries
of TIMEOUT_S each), not the library's minutes of retries. Credentials come from the worker's
environment, as the mlflow client reads them: MLFLOW_TRACKING_TOKEN (a bearer token), or
MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth).

The MLflow run carries the tag gvpo.run_id: an attempt that resumes the run after a worker
died finds that MLflow run and goes on with it.
"""

import base64
import json
import math
import os
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from service.contract.outbound import OutboundClient, Refused, Transient
from service.contract.states import RunStatus
from workers.tracking.base import RunInfo, TrackerError, as_text, flatten, tracker_name

TIMEOUT_S = 10.0  # one request's connect / read / write
ATTEMPTS = 2  # tries of a request that met a network error, a 5xx or a 429
RETRY_S = 1.0
MAX_ANSWER = 16 * 1024 * 1024
# MLflow's limits (mlflow/utils/validation.py): per log-batch request, and of a parameter
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000
MAX_KEY, MAX_VALUE = 250, 6000
RUN_TAG = "gvpo.run_id"
ENDED = {
    RunStatus.SUCCEEDED: "FINISHED",
    RunStatus.FAILED: "FAILED",
    RunStatus.CANCELLED: "KILLED",
}


def _number(value: float) -> float | str:
    """A metric value in MLflow's JSON (protobuf's spelling of the non-finite ones)."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


class MlflowRest:
    """The few calls of MLflow's REST API that tracking needs, at `uri`."""

    def __init__(self, uri: str, allow_private: bool) -> None:
        self.uri = uri.rstrip("/")
        self.client = OutboundClient(allow_private, TIMEOUT_S)
        self.headers = _credentials()

    def call(self, method: str, path: str, body: Any = None, query: dict | None = None) -> dict:
        """The JSON answer of `method` /api/2.0/mlflow/<path>; TrackerError for anything
        but a 200 (RESOURCE_DOES_NOT_EXIST: None)."""
        url = f"{self.uri}/api/2.0/mlflow/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        content = None if body is None else json.dumps(body).encode()
        status, text = self._send(method, url, content, {"Content-Type": "application/json"})
        if status != 200:
            raise TrackerError(f"{method} {path}: HTTP {status}: {text[:300]}")
        return json.loads(text or "{}")

    def put_file(self, artifact_root: str, name: str, file: Path) -> None:
        """Upload `file` as the artifact `name` of the run whose artifact_uri is
        `artifact_root` (mlflow-artifacts:/<experiment>/<run>/artifacts)."""
        where = urllib.parse.quote(f"{artifact_root}/{name}")
        url = f"{self.uri}/api/2.0/mlflow-artifacts/artifacts/{where}"
        size = file.stat().st_size
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        status, text = self._send("PUT", url, lambda: _chunks(file), headers)
        if status != 200:
            raise TrackerError(f"upload of artifact {name}: HTTP {status}: {text[:300]}")

    def _send(self, method: str, url: str, content, headers: dict) -> tuple[int, str]:
        """(status, body) of one request, tried ATTEMPTS times over network errors, 5xx and
        429; `content`: bytes, or a function making an iterator of them (for each try)."""
        for attempt in range(1, ATTEMPTS + 1):
            body = content() if callable(content) else content
            try:
                with self.client.stream(
                    method, url, headers={**self.headers, **headers}, content=body
                ) as resp:
                    text = resp.read()[:MAX_ANSWER].decode("utf-8", "replace")
                if resp.status_code < 500 and resp.status_code != 429:
                    return resp.status_code, text
                why = f"HTTP {resp.status_code}: {text[:300]}"
            except Refused as exc:
                raise TrackerError(str(exc)) from None
            except Transient as exc:
                why = exc.answer
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            if attempt == ATTEMPTS:
                raise TrackerError(f"{self.uri} did not answer ({why}; {attempt} tries)")
            time.sleep(RETRY_S)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.client.close()


def _credentials() -> dict[str, str]:
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user, password = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD"))
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


def _chunks(file: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with file.open("rb") as fh:
        while chunk := fh.read(size):
            yield chunk


class MlflowSink:
    name = "mlflow"

    def __init__(self, spec, allow_private: bool) -> None:
        """`spec`: the run's tracking.mlflow (service/contract/tracking.py MlflowTracking)."""
        self.spec, self.allow_private = spec, allow_private
        self.checkpoints = spec.checkpoints
        self.rest: MlflowRest | None = None
        self.run_id = self.artifacts = None
        self.logged: dict[str, int] | None = None

    def metric_key(self, name: str) -> str:
        return tracker_name(name)

    def start(self, run: RunInfo) -> dict[str, Any]:
        self.rest = rest = MlflowRest(self.spec.uri, self.allow_private)
        experiment = self._experiment()
        found = rest.call(
            "POST",
            "runs/search",
            {
                "experiment_ids": [experiment],
                "filter": f"tags.`{RUN_TAG}` = '{run.run_id}'",
                "max_results": 1,
            },
        ).get("runs")
        if found:
            info = found[0]["info"]
            rest.call("POST", "runs/update", {"run_id": info["run_id"], "status": "RUNNING"})
            self.logged = {  # its latest step of each metric: a replayed step is not sent
                m["key"]: int(m.get("step", 0)) for m in found[0].get("data", {}).get("metrics", [])
            }
        else:
            info = self._create(experiment, run)
        self.run_id = info["run_id"]
        uri = info.get("artifact_uri", "")
        # Artifacts the server stores itself; another store (s3://...) the client would write
        # to with credentials of its own, which this worker does not hold.
        if uri.startswith("mlflow-artifacts:"):
            self.artifacts = urllib.parse.urlparse(uri).path.strip("/")
            if not found:
                self._put_text("gvpo/spec.json", json.dumps(run.spec, indent=2), run)
        return {
            "run_id": self.run_id,
            "experiment_id": experiment,
            "url": f"{rest.uri}/#/experiments/{experiment}/runs/{self.run_id}",
            "continued": bool(found),
            "artifacts": self.artifacts is not None,
        }

    def _experiment(self) -> str:
        name = self.spec.experiment
        try:
            got = self.rest.call("GET", "experiments/get-by-name", query={"experiment_name": name})
            return got["experiment"]["experiment_id"]
        except TrackerError as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc):
                raise
        try:
            return self.rest.call("POST", "experiments/create", {"name": name})["experiment_id"]
        except TrackerError as exc:  # another run made it meanwhile
            if "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
            got = self.rest.call("GET", "experiments/get-by-name", query={"experiment_name": name})
            return got["experiment"]["experiment_id"]

    def _create(self, experiment: str, run: RunInfo) -> dict:
        name = self.spec.run_name or run.name
        tags = {RUN_TAG: run.run_id, "mlflow.runName": name, "mlflow.source.name": "gvpo"}
        created = self.rest.call(
            "POST",
            "runs/create",
            {
                "experiment_id": experiment,
                "run_name": name,
                "start_time": int(time.time() * 1000),
                "tags": [{"key": k, "value": v} for k, v in tags.items()],
            },
        )
        info = created["run"]["info"]
        params = [
            {"key": key[:MAX_KEY], "value": as_text(value)[:MAX_VALUE]}
            for key, value in flatten(run.spec)
        ]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            batch = params[start : start + PARAMS_PER_BATCH]
            self.rest.call("POST", "runs/log-batch", {"run_id": info["run_id"], "params": batch})
        return info

    def _put_text(self, name: str, text: str, run: RunInfo) -> None:
        staged = run.folder / "tracking" / "mlflow" / Path(name).name
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_text(text)
        try:
            self.rest.put_file(self.artifacts, name, staged)
        finally:
            staged.unlink(missing_ok=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        rows = [
            {"key": tracker_name(k), "value": _number(float(v)), "timestamp": now, "step": step}
            for k, v in metrics.items()
        ]
        for start in range(0, len(rows), METRICS_PER_BATCH):
            batch = rows[start : start + METRICS_PER_BATCH]
            self.rest.call("POST", "runs/log-batch", {"run_id": self.run_id, "metrics": batch})

    def log_checkpoint(self, step: int, folder: Path) -> None:
        if self.artifacts is None:
            return
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = f"checkpoints/step_{step:06d}/{file.relative_to(folder).as_posix()}"
            self.rest.put_file(self.artifacts, name, file)

    def finish(self, status: RunStatus | None) -> None:
        if self.rest is None:
            return
        try:
            if status in ENDED and self.run_id:
                self.rest.call(
                    "POST",
                    "runs/update",
                    {
                        "run_id": self.run_id,
                        "status": ENDED[status],
                        "end_time": int(time.time() * 1000),
                    },
                )
        finally:
            self.rest.close()
