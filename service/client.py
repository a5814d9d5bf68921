"""A small Python client for the gvpo-service REST API (used by the CLI, the demo and tests).

from service.client import Client
client = Client("http://127.0.0.1:8000", api_key)
f = client.upload_file("train.jsonl")
run = client.create_run({"model": {"path": ...}, "dataset": {"train_file": f["id"]}, ...})
run = client.wait(run["id"])
"""

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from service.contract.sources import with_absolute_paths
from service.contract.states import TERMINAL


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: dict | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details or {}


class Client:
    def __init__(self, base_url: str, api_key: str | None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw) -> Any:
        resp = self.http.request(method, path, **kw)
        if resp.status_code >= 400:
            self._raise(resp)
        return resp.json()

    @staticmethod
    def _raise(resp: httpx.Response) -> None:
        try:
            err = resp.json()["error"]
        except (ValueError, KeyError, TypeError):
            err = {"code": "http_error", "message": resp.text[:500]}
        raise ApiError(
            resp.status_code, err.get("code", "error"), err.get("message", ""), err.get("details")
        )

    # files
    def upload_file(self, path: str | Path, purpose: str = "train") -> dict:
        with open(path, "rb") as fh:
            return self._request(
                "POST",
                "/v1/files",
                data={"purpose": purpose},
                files={"file": (Path(path).name, fh, "application/jsonl")},
            )

    def file_content(self, file_id: str) -> bytes:
        resp = self.http.get(f"/v1/files/{file_id}/content")
        if resp.status_code >= 400:
            self._raise(resp)
        return resp.content

    def list_files(self) -> list[dict]:
        return self._request("GET", "/v1/files")["data"]

    # runs
    def create_run(self, spec: dict, idempotency_key: str | None = None) -> dict:
        """A relative model folder (./tiny) is made absolute here, where the caller means it:
        the API refuses one, which it would read against its own directory."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/runs", json=with_absolute_paths(spec), headers=headers)

    def get_run(self, run_id: str) -> dict:
        return self._request("GET", f"/v1/runs/{run_id}")

    def list_runs(
        self, status: str | None = None, limit: int = 20, after: str | None = None
    ) -> dict:
        params = {k: v for k, v in {"status": status, "limit": limit, "after": after}.items() if v}
        return self._request("GET", "/v1/runs", params=params)

    def cancel_run(self, run_id: str) -> dict:
        return self._request("POST", f"/v1/runs/{run_id}/cancel")

    def pause_run(self, run_id: str) -> dict:
        return self._request("POST", f"/v1/runs/{run_id}/pause")

    def resume_run(self, run_id: str) -> dict:
        return self._request("POST", f"/v1/runs/{run_id}/resume")

    def events(self, run_id: str, after: int | None = None) -> list[dict]:
        params = {"after": after} if after is not None else {}
        return self._request("GET", f"/v1/runs/{run_id}/events", params=params)["data"]

    def follow(
        self, run_id: str, after_event: int | None = None, since_step: int = 0
    ) -> Iterator[tuple[str, dict]]:
        """The run's live stream (Server-Sent Events), until the run ends: ("run", run) when its
        status or step changes, ("metrics", {"step", "values"}) per finished step, and
        (event type, event) per event. Resume a broken stream with the last event id and step
        seen."""
        headers = {"Last-Event-ID": str(after_event)} if after_event is not None else {}
        params = {"metrics": "true", "since_step": since_step}
        # The server sends a keep-alive at least every 15 s, so a silent minute means it is gone.
        with self.http.stream(
            "GET",
            f"/v1/runs/{run_id}/events/stream",
            params=params,
            headers=headers,
            timeout=httpx.Timeout(30, read=60),
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._raise(resp)
            fields: dict[str, str] = {}
            for line in resp.iter_lines():
                if line:
                    if not line.startswith(":"):  # a comment: keep-alive
                        name, _, value = line.partition(":")
                        fields[name] = value.removeprefix(" ")
                elif "data" in fields:
                    yield fields.get("event", "message"), json.loads(fields["data"])
                    fields = {}

    def metrics(
        self, run_id: str, names: list[str] | None = None, since_step: int | None = None
    ) -> dict[str, list[list[float]]]:
        params: dict[str, Any] = {}
        if names:
            params["names"] = ",".join(names)
        if since_step is not None:
            params["since_step"] = since_step
        return self._request("GET", f"/v1/runs/{run_id}/metrics", params=params)["metrics"]

    def samples(self, run_id: str, step: int | None = None) -> dict:
        params = {"step": step} if step is not None else {}
        return self._request("GET", f"/v1/runs/{run_id}/samples", params=params)

    def checkpoints(self, run_id: str) -> list[dict]:
        return self._request("GET", f"/v1/runs/{run_id}/checkpoints")["data"]

    def download_checkpoint(
        self, run_id: str, ckpt_id: str, dest: str | Path, format: str = "stored"
    ) -> Path:
        """Save the checkpoint's .tar.gz; format="merged" merges a LoRA adapter into its base."""
        dest = Path(dest)
        url = f"/v1/runs/{run_id}/checkpoints/{ckpt_id}/download"
        with self.http.stream("GET", url, params={"format": format}) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._raise(resp)
            with dest.open("wb") as out:
                for chunk in resp.iter_bytes():
                    out.write(chunk)
        return dest

    def download_url(self, run_id: str, ckpt_id: str, format: str = "stored") -> dict:
        """A signed link to the checkpoint's archive, usable without the API key for 10 minutes:
        {"url": <path on the API's origin>, "expires_at": ...}."""
        return self._request(
            "POST",
            f"/v1/runs/{run_id}/checkpoints/{ckpt_id}/download-url",
            params={"format": format},
        )

    # off-policy groups and re-scoring
    def post_groups(self, run_id: str, groups: list[dict]) -> dict:
        return self._request("POST", f"/v1/runs/{run_id}/groups", json={"groups": groups})

    def rescore(self, run_id: str, reward: dict) -> dict:
        return self._request("POST", f"/v1/runs/{run_id}/rescore", json={"reward": reward})

    def get_rescore(self, run_id: str, rescore_id: str) -> dict:
        return self._request("GET", f"/v1/runs/{run_id}/rescores/{rescore_id}")

    def wait(
        self,
        run_id: str,
        timeout: float = 3600,
        poll_s: float = 1.0,
        on_poll: Callable[[dict], None] | None = None,
    ) -> dict:
        """Poll until the run is finished; on_poll sees each snapshot (for progress display)."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.get_run(run_id)
            if on_poll:
                on_poll(run)
            if run["status"] in TERMINAL:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {run['status']} after {timeout:.0f} s")
            time.sleep(poll_s)
