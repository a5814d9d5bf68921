"""The Python client of the gvpo-service REST API (the `gvpo` CLI and the demo use it too).

    from gvpo_client import Client

    with Client("http://127.0.0.1:8000", api_key) as client:
        f = client.upload_file("train.jsonl")
        run = client.create_run({"model": {"path": ...}, "dataset": {"train_file": f["id"]}, ...})
        run = client.wait(run["id"])

Answers are the API's JSON as plain dicts, typed as gvpo_client.schemas says. A refusal (any
status of 400 or more) raises ApiError with the API's error code and message.
"""

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import httpx

from gvpo_client.paths import with_absolute_paths
from gvpo_client.schemas import (
    Checkpoint,
    DownloadLink,
    Estimate,
    Event,
    File,
    GroupsStatus,
    MetricName,
    Metrics,
    Rescore,
    Run,
    RunCreated,
    RunList,
    RunUsage,
    Samples,
    StepMetrics,
    Usage,
)

# The statuses a run never leaves (service/contract/states.py; a test keeps them equal).
TERMINAL = ("succeeded", "failed", "cancelled")
EVENTS_PAGE = 1000  # the most GET /v1/runs/{id}/events answers at once


class ApiError(Exception):
    """The API refused a request: its HTTP status, error code (`not_found`, `invalid_spec`,
    ...), message and details, as its error body says."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.details: dict[str, Any] = details or {}


class Client:
    """A project's view of one gvpo-service API: `base_url` (http://host:8000) and its API key
    (None: an API that asks for none). Use it in a `with` block, or call close()."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> Any:
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

    # ------------------------------------------------------------ files

    def upload_file(self, path: str | Path, purpose: str = "train") -> File:
        """Upload a JSONL file; purpose is train, eval, offpolicy or fine-tune. The API checks
        every row and refuses the file (ApiError 422) naming the first bad one."""
        with open(path, "rb") as fh:
            return cast(
                File,
                self._request(
                    "POST",
                    "/v1/files",
                    data={"purpose": purpose},
                    files={"file": (Path(path).name, fh, "application/jsonl")},
                ),
            )

    def list_files(self) -> list[File]:
        """The project's files, newest first."""
        return cast(list[File], self._request("GET", "/v1/files")["data"])

    def file_content(self, file_id: str) -> bytes:
        """The file's bytes, as uploaded (or as a rescore wrote it)."""
        resp = self.http.get(f"/v1/files/{file_id}/content")
        if resp.status_code >= 400:
            self._raise(resp)
        return resp.content

    # ------------------------------------------------------------ runs

    def create_run(self, spec: dict[str, Any], idempotency_key: str | None = None) -> RunCreated:
        """Submit a run spec (the manual's run-spec page); the run is queued. With an
        idempotency key, submitting the same spec again answers the same run. A relative model
        folder (./tiny) is sent absolute against the current directory, where the caller means
        it: the API refuses one, which it would read against its own directory."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        sent = with_absolute_paths(spec)
        return cast(RunCreated, self._request("POST", "/v1/runs", json=sent, headers=headers))

    def get_run(self, run_id: str) -> Run:
        return cast(Run, self._request("GET", f"/v1/runs/{run_id}"))

    def list_runs(
        self, status: str | None = None, limit: int = 20, after: str | None = None
    ) -> RunList:
        """A page of the project's runs, newest first (of one status, when given); the next
        page is list_runs(after=page["next_cursor"]) while page["has_more"]."""
        params = {k: v for k, v in {"status": status, "limit": limit, "after": after}.items() if v}
        return cast(RunList, self._request("GET", "/v1/runs", params=params))

    def cancel_run(self, run_id: str) -> Run:
        """Cancel the run: at once when queued or paused, else its worker stops between steps
        (cancel_requested is true until then)."""
        return cast(Run, self._request("POST", f"/v1/runs/{run_id}/cancel"))

    def pause_run(self, run_id: str) -> Run:
        """Pause a queued or running run (a running one checkpoints and frees its worker after the
        current step); resume_run() continues it from that checkpoint."""
        return cast(Run, self._request("POST", f"/v1/runs/{run_id}/pause"))

    def resume_run(self, run_id: str) -> Run:
        return cast(Run, self._request("POST", f"/v1/runs/{run_id}/resume"))

    def wait(
        self,
        run_id: str,
        timeout: float = 3600,
        poll_s: float = 1.0,
        on_poll: Callable[[Run], None] | None = None,
    ) -> Run:
        """Poll until the run has ended (a status in TERMINAL) and return it; on_poll sees
        each snapshot (for progress display). TimeoutError after `timeout` seconds."""
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

    # ------------------------------------------------------------ what a run records

    def events(self, run_id: str, after: int | None = None) -> list[Event]:
        """The run's events, oldest first (those after event id `after`, when given), every
        page of them."""
        found: list[Event] = []
        while True:
            params: dict[str, int] = {"limit": EVENTS_PAGE}
            if after is not None:
                params["after"] = after
            page = self._request("GET", f"/v1/runs/{run_id}/events", params=params)
            found += page["data"]
            if not page["has_more"] or not page["data"]:
                return found
            after = page["data"][-1]["id"]

    def follow(
        self, run_id: str, after_event: int | None = None, since_step: int = 0
    ) -> Iterator[tuple[str, Run | StepMetrics | Event]]:
        """The run's live stream (Server-Sent Events) until the run ends, as (kind, data):
        ("run", Run) when its status or step changes, ("metrics", StepMetrics) per finished
        step, and (event type, Event) per event. Resume a broken stream with the last event id
        and step seen."""
        headers = {"Last-Event-ID": str(after_event)} if after_event is not None else {}
        params: dict[str, str | int] = {"metrics": "true", "since_step": since_step}
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
        self,
        run_id: str,
        names: list[str] | None = None,
        since_step: int | None = None,
        max_points: int | None = None,
        with_time: bool = False,
    ) -> Metrics:
        """The run's metric curves, name -> [[step, value], ...]: every metric, or those
        named; from step `since_step` on, when given. `max_points`: a longer series comes as
        each run of steps' lowest and highest point; `with_time`: points are [step, value,
        unix seconds recorded]."""
        params: dict[str, Any] = {"names": ",".join(names) if names else None}
        params |= {"since_step": since_step, "max_points": max_points}
        params = {k: v for k, v in params.items() if v is not None}
        if with_time:
            params["with_time"] = "true"
        return cast(
            Metrics, self._request("GET", f"/v1/runs/{run_id}/metrics", params=params)["metrics"]
        )

    def metric_names(self, run_id: str) -> list[MetricName]:
        """Every series the run has recorded: name, points, first_step, last_step."""
        return cast(
            list[MetricName], self._request("GET", f"/v1/runs/{run_id}/metrics/names")["data"]
        )

    def samples(self, run_id: str, step: int | None = None, limit: int | None = None) -> Samples:
        """One step's samples (the latest step's when `step` is None): each prompt, completion
        and reward, with rewards re-scorings replaced; at most `limit` (the API's default:
        1000)."""
        params = {k: v for k, v in {"step": step, "limit": limit}.items() if v is not None}
        return cast(Samples, self._request("GET", f"/v1/runs/{run_id}/samples", params=params))

    # ------------------------------------------------------------ checkpoints

    def checkpoints(self, run_id: str) -> list[Checkpoint]:
        """The run's kept checkpoints, oldest step first."""
        return cast(
            list[Checkpoint], self._request("GET", f"/v1/runs/{run_id}/checkpoints")["data"]
        )

    def download_checkpoint(
        self,
        run_id: str,
        ckpt_id: str,
        dest: str | Path,
        format: Literal["stored", "merged"] = "stored",
    ) -> Path:
        """Save the checkpoint as a .tar.gz at `dest` (a folder named after the checkpoint's id
        inside), streamed to disk. format="stored": as saved (a LoRA run's adapter alone);
        "merged": a LoRA adapter merged into its base model, loadable on its own."""
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

    def download_url(
        self, run_id: str, ckpt_id: str, format: Literal["stored", "merged"] = "stored"
    ) -> DownloadLink:
        """A signed link to the checkpoint's archive, usable without the API key for 10 minutes:
        {"url": <path on the API's origin>, "expires_at": ...}."""
        url = f"/v1/runs/{run_id}/checkpoints/{ckpt_id}/download-url"
        return cast(DownloadLink, self._request("POST", url, params={"format": format}))

    # ------------------------------------------------------------ inference

    def models(self) -> list[dict[str, Any]]:
        """The project's servable models (OpenAI's model objects): runs that publish their
        weights (run_…) and checkpoints (ckpt_…). Any OpenAI client works as well."""
        return self._request("GET", "/v1/models")["data"]

    def sample(
        self, model: str, prompt: str | list[dict[str, Any]], chat: bool = True, **params: Any
    ) -> dict[str, Any]:
        """One completion request to `model` (a ckpt_… or run_… id): `prompt` as the user's
        message (or a list of messages) to /v1/chat/completions, or with chat=False as text to
        /v1/completions; `params` are OpenAI's (n, max_tokens, temperature, ...). The answer
        as OpenAI gives it. The first request for a model waits while it loads."""
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            body = {"model": model, "messages": messages, **params}
            return self._request("POST", "/v1/chat/completions", json=body, timeout=None)
        body = {"model": model, "prompt": prompt, **params}
        return self._request("POST", "/v1/completions", json=body, timeout=None)

    # ------------------------------------------------------------ off-policy groups, re-scoring

    def post_groups(self, run_id: str, groups: list[dict[str, Any]]) -> GroupsStatus:
        """Add off-policy groups ({"prompt", "completions", "rewards"?, ...}, or chat episodes
        {"messages", "episodes", "rewards"?, ...}, as in an offpolicy file, or episodes of
        completions served with metadata.gvpo_episode {"episodes": [{"completion_ids",
        "reward"}, ...]}; up to 1,000 a request) to a queued, running or paused run: its next
        steps train on them."""
        return cast(
            GroupsStatus,
            self._request("POST", f"/v1/runs/{run_id}/groups", json={"groups": groups}),
        )

    def rescore(self, run_id: str, reward: dict[str, Any]) -> Rescore:
        """Score a finished run's samples again with `reward` (a run spec's reward section);
        poll get_rescore() until it has succeeded or failed."""
        return cast(
            Rescore, self._request("POST", f"/v1/runs/{run_id}/rescore", json={"reward": reward})
        )

    def get_rescore(self, run_id: str, rescore_id: str) -> Rescore:
        return cast(Rescore, self._request("GET", f"/v1/runs/{run_id}/rescores/{rescore_id}"))

    # ------------------------------------------------------------ usage

    def usage(
        self, group_by: str = "day", since: str | None = None, until: str | None = None
    ) -> Usage:
        """What the project's runs used, per day (UTC) or per run, from `since` to `until`
        (ISO days, inclusive); with the project's quota and the device-hours it has used."""
        params = {"group_by": group_by, "since": since, "until": until}
        return cast(
            Usage,
            self._request("GET", "/v1/usage", params={k: v for k, v in params.items() if v}),
        )

    def run_usage(self, run_id: str) -> RunUsage:
        return cast(RunUsage, self._request("GET", f"/v1/runs/{run_id}/usage"))

    def estimate(self, spec: dict[str, Any]) -> Estimate:
        """What a run spec would use, before it is submitted (checked as create_run checks
        it)."""
        return cast(
            Estimate, self._request("POST", "/v1/runs:estimate", json=with_absolute_paths(spec))
        )
