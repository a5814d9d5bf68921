"""One run's training loop: rollout -> rewards -> learn -> record -> checkpoint, each step.

The process holds the model in memory for the whole run (execute.py claims the run and turns
how the loop ends into the run's outcome). Between steps the loop checks whether the lease was
lost or the user asked for a cancel or a pause; under data parallelism the lead decides and
every rank follows.
"""

import logging
import math
import random
import shutil
import time
from pathlib import Path

import torch

from service.checkpoints import store
from service.config import Settings
from service.db import session_scope
from service.files.service import read_rows
from service.models import File
from service.runs.spec import RunSpec, offpolicy_per_engine
from workers.data import Example, PromptSampler, load_examples
from workers.learner.checkpoint import (load_training_state, restore_rng, rng_state,
                                       save_checkpoint)
from workers.learner.learner import GroupBatch, Learner, LearnStats
from workers.offpolicy import (Slot, as_rollout, draw_slots, load_groups, per_source,
                               sampled_by_run, score_slots, slot_sources)
from workers.errors import RunError
from workers.evaluation import eval_metrics
from workers.heartbeat import Heartbeat
from workers.model_loading import load_policy, pick_device, pick_dtype
from workers.ranks import Ranks
from workers.records import RunRecorder
from workers.rewards.base import Scores
from workers.rewards.scoring import build_scorer
from workers.rewards.webhook import WebhookContext
from workers.rollout.base import Rollout, RolloutEngine
from workers.rollout.hf import HFRolloutEngine
from workers.rollout.text import eos_token_ids
from workers.rollout.vllm import start_vllm
from workers.watchdog import Watchdog

log = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 3
UPLOAD_BACKOFF_S = 1.0  # doubled per try


class LeaseLost(Exception):
    pass


class Cancelled(Exception):
    pass


class Paused(Exception):
    def __init__(self, step: int) -> None:
        super().__init__(f"paused after step {step}")
        self.step = step


class RunLoop:
    def __init__(self, settings: Settings, recorder: RunRecorder, spec: RunSpec,
                 heartbeat: Heartbeat | None, ranks: Ranks) -> None:
        """`heartbeat`: the lead's (lease and watchdog); None on the other ranks."""
        self.settings, self.recorder, self.spec, self.heartbeat = settings, recorder, spec, heartbeat
        self.ranks, self.lead = ranks, ranks.lead
        self.watchdog = heartbeat.watchdog if heartbeat else Watchdog(None)
        self.run_dir = settings.runs_dir / recorder.run_id

    def _setup(self) -> None:
        spec = self.spec
        torch.set_num_threads(self.settings.torch_threads)
        torch.manual_seed(spec.training.seed)
        random.seed(spec.training.seed)
        self.device = pick_device(spec)
        # (step, path) when an earlier attempt died
        resume = self.ranks.share(self.recorder.latest_checkpoint() if self.lead else None)
        local = resume and self._local_copy(
            resume[1], self.run_dir / "checkpoint-cache" / f"step_{resume[0]:06d}",
            f"the checkpoint of step {resume[0]}")
        self.spec = spec = self._local_model(spec)
        # vLLM first: it sizes its GPU share from the memory free when it starts.
        vllm_engine = start_vllm(spec, self.device, pick_dtype(spec, self.device), self.ranks,
                                 self._fallback)
        self.model, self.tokenizer = load_policy(spec, self.device, local)
        self.ranks.align(self.model)
        self.engine: RolloutEngine = vllm_engine or HFRolloutEngine(
            self.model, self.tokenizer, self.device, synced=spec.resources.strategy == "fsdp")
        # The engine starts from spec.model.path: the same weights, unless resuming or going on
        # with an adapter.
        self.engine_stale = resume is not None or spec.model.adapter is not None
        self.learner = Learner(self.model, spec, self.device, self.tokenizer.pad_token_id,
                               self._initial_model() if resume else None)
        webhooks = WebhookContext.of_run(self.settings, self.recorder)
        self.scorer = build_scorer(spec.reward, webhooks) if self.lead else None
        self.diff_warn = spec.rollout.logprob_diff_warn or (
            1e-3 if pick_dtype(spec, self.device) == torch.float32 else 1.0)
        self.last_diff_warning: int | None = None
        self.start_step, self.checkpointed = 1, 0
        self.sampler = PromptSampler(self._examples(), spec.training.seed)
        self.eval_examples = (self._examples("eval_file")[: spec.eval.max_prompts]
                              if spec.dataset.eval_file else [])
        self.groups = (PromptSampler(load_groups(self._rows("offpolicy_file")), spec.training.seed)
                       if spec.dataset.offpolicy_file else None)
        self.eos_id = eos_token_ids(self.model.generation_config.eos_token_id, self.tokenizer)[0]
        # Each engine samples its own completions; ranks sharing a tensor-parallel engine must
        # draw the same random numbers, or their shards would compute different sequences.
        if engine_group := self.ranks.engine:
            torch.manual_seed(spec.training.seed + engine_group)
            random.seed(spec.training.seed + engine_group)
        if resume:
            self._resume(*resume, local)
            self.ranks.share(None)  # every rank has read the checkpoint
            if store.is_remote(resume[1]) and self.lead:  # the downloaded copy: all loaded now
                shutil.rmtree(local, ignore_errors=True)
        if not self.lead:
            return
        world = self.ranks.world
        where = f"{world} processes on {self.device}" if world > 1 else str(self.device)
        self.recorder.event(
            "run.model_loaded",
            f"loaded {spec.model.path} on {where}; rollouts with {self.engine.name}",
            data={"device": str(self.device), "rollout_engine": self.engine.name,
                  "ranks": world, "parameters": sum(p.numel() for p in self.model.parameters())})

    def _initial_model(self):
        """reference="initial" after a resume: the starting weights, not the checkpoint's."""
        if self.spec.algorithm.reference != "initial" or self.spec.model.lora is not None:
            return None
        return load_policy(self.spec, self.device)[0]

    def _local_model(self, spec: RunSpec) -> RunSpec:
        """The spec with its model on this machine: a model.path or model.adapter in the object
        store (a checkpoint the run starts from) is downloaded into the run's folder first."""
        local = {name: str(self._local_copy(path, self.run_dir / "start-cache" / name,
                                            f"model.{name} {path}"))
                 for name in ("path", "adapter")
                 if (path := getattr(spec.model, name)) and store.is_remote(path)}
        if not local:
            return spec
        return spec.model_copy(update={"model": spec.model.model_copy(update=local)})

    def _local_copy(self, path: str, cache: Path, what: str) -> Path:
        """`path` as a local folder: one in the object store is downloaded into `cache` under
        the data dir first (this worker may not be the one that wrote it)."""
        if not store.is_remote(path):
            return Path(path)
        failure = None  # the lead downloads; every rank reads its copy
        if self.lead:
            try:
                store.download(path, cache)
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
        if failure := self.ranks.share(failure):
            raise RunError(f"could not download {what} from {path}: {failure}")
        return cache

    def _resume(self, step: int, path: str, local: Path) -> None:
        """Continue after checkpoint `step` (at `path`, read from the folder `local`): optimizer,
        data cursor and RNG as they were then (the RNG last, once nothing else in the set-up
        draws from it)."""
        optimizer, state = load_training_state(local)
        self.learner.load_optimizer_state(optimizer)
        self.sampler = self.sampler.at(state["data_cursor"])
        if self.groups is not None:
            self.groups = self.groups.at(state["offpolicy_cursor"])
        each = state.get("rng_ranks") or [state["rng"]]
        restore_rng(each[self.ranks.rank] if len(each) == self.ranks.world else state["rng"])
        self.start_step, self.checkpointed = step + 1, step
        if self.lead:
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

    def _fallback(self, why: str) -> None:
        if self.lead:
            self.recorder.event("rollout.fallback", f"vLLM could not start ({why}); rolling out "
                                "with transformers", "warning")

    def _rows(self, kind: str) -> list[dict]:
        """The rows of the spec's dataset.<kind> file."""
        file_id = getattr(self.spec.dataset, kind)
        with session_scope(self.settings.resolved_database_url) as session:
            file = session.get(File, file_id)
            if file is None:
                raise RunError(f"dataset.{kind} {file_id!r} no longer exists")
            path = file.path
        return read_rows(path)

    def _examples(self, kind: str = "train_file") -> list[Example]:
        ds = self.spec.dataset
        return load_examples(self._rows(kind), ds.prompt_field, ds.answer_field)

    def run(self) -> None:
        self._setup()
        total = self.spec.training.steps
        every = self.spec.checkpoint.every_steps
        try:
            for step in range(self.start_step, total + 1):
                self._check_control(step - 1)
                self._step(step)
                if self.eval_examples and (step % self.spec.eval.every_steps == 0
                                           or step == total):
                    self._evaluate(step, final=step == total)
                if step % every == 0 or step == total:
                    self._checkpoint(step)
        finally:
            self.engine.close()
        if self.lead:
            self.recorder.finish("succeeded", f"run finished after {total} steps")

    def _check_control(self, done: int) -> None:
        """Between steps (`done` steps finished): stop if the lease was lost or the user asked
        (the lead looks; every rank follows). A pause first checkpoints the last finished step,
        unless one is already there."""
        stop = None
        if self.lead:
            stop = "lost" if self.heartbeat.lost.is_set() else self.recorder.requested_stop()
        stop = self.ranks.share(stop)
        if stop == "lost":
            raise LeaseLost()
        if stop == "cancel":
            raise Cancelled()
        if stop == "pause":
            if done and done != self.checkpointed:
                self._checkpoint(done)
            raise Paused(done)

    def _step(self, step: int) -> None:
        t0, watch = time.perf_counter(), self.watchdog
        watch.enter("rollout", step)
        slots = self._draw(step)  # the same on every rank
        k = self.spec.algorithm.group_size
        if any(sampled_by_run(group, k) for _, group in slots):  # whole groups sample nothing
            self._sync_engine()  # once per step: nothing samples between the step's updates
        t_sync = time.perf_counter()
        generated = self._roll_out(self.ranks.engine_share(slots))
        self.engine.offload()
        mine = self.ranks.own_part(generated)
        rollouts = self.ranks.gather_engines(generated)  # the lead's: all, in prompt order
        t1 = time.perf_counter()
        watch.enter("reward", step)
        scores = self.ranks.share(score_slots(self.scorer, step, slots, rollouts) if self.lead
                                  else None)
        t2 = time.perf_counter()
        watch.enter("learn", step)
        rewards = self.ranks.shard(scores.rewards)  # (G / ranks, k): this rank's groups
        reported = any(c.logprobs is not None for r in mine for c in r.completions)
        batch = GroupBatch([r.prompt_ids for r in mine],
                           [[c.token_ids for c in r.completions] for r in mine], rewards,
                           [[c.logprobs for c in r.completions] for r in mine]
                           if reported else None)
        stats = self.learner.learn(batch, step)  # summed over ranks
        self.engine_stale |= stats.updates > 0  # a step that trained no group changed nothing
        if not math.isfinite(stats.loss):
            raise RunError(f"training diverged: the loss is {stats.loss} at step {step}; "
                           "try a lower optimizer.lr or a larger algorithm.beta")
        t3 = time.perf_counter()
        watch.leave()
        if self.lead:
            times = {"time/weight_sync_s": t_sync - t0, "time/rollout_s": t1 - t_sync,
                     "time/reward_s": t2 - t1, "time/learn_s": t3 - t2}
            self._record(step, slots, rollouts, scores, stats, times)
            self._warn_on_drift(step, stats.logprob_diff_max)

    def _draw(self, step: int) -> list[Slot]:
        training, engines = self.spec.training, self.ranks.engines
        off = offpolicy_per_engine(training, engines) if training.offpolicy_fraction else 0
        posted = None
        if self.lead and off:  # the lead reads the groups posted to the run; every rank gets them
            posted = self.recorder.take_groups(step, off * engines, engines)
        posted = load_groups(self.ranks.share(posted) or [])
        self.posted_taken = len(posted)
        return draw_slots(self.sampler, self.groups, posted, off, training.prompts_per_step,
                          engines)

    def _roll_out(self, share: list[Slot]) -> list[Rollout]:
        """Fresh completions for the share's prompts, and its off-policy groups as given (one
        of fewer than k topped up with fresh ones)."""
        k = self.spec.algorithm.group_size
        fresh = [example.prompt for example, group in share if sampled_by_run(group, k)]
        made = iter(self.engine.generate(fresh, k, self.spec.sampling) if fresh else [])
        return [next(made) if group is None else
                as_rollout(group, self.tokenizer, self.eos_id,
                           next(made) if sampled_by_run(group, k) else None)
                for _, group in share]

    def _sync_engine(self) -> None:
        """Give the rollout engine the policy's weights, if an update changed them since."""
        if self.engine_stale:
            self.engine.load_weights(self.model)
            self.engine_stale = False

    def _evaluate(self, step: int, final: bool) -> None:
        """Sample eval.samples_per_prompt completions of every eval prompt from the policy as it
        is after `step`, score them with the run's reward, and record eval/pass@1, eval/pass@k
        and eval/reward_mean at that step (each engine takes a share of the prompts)."""
        spec, examples = self.spec.eval, self.eval_examples
        self.watchdog.enter("eval", step)
        self._sync_engine()
        padded = examples + examples[-1:] * (-len(examples) % self.ranks.engines)  # equal shares
        generated = self.engine.generate([e.prompt for e in self.ranks.engine_share(padded)],
                                         spec.samples_per_prompt, self.spec.sampling)
        self.engine.offload()
        rollouts = self.ranks.gather_engines(generated)[: len(examples)]
        if self.lead:
            scores = self.scorer.score(step, examples, rollouts, purpose="eval")
            metrics = eval_metrics(scores.rewards, spec.pass_threshold, spec.pass_k)
            self.recorder.record_metrics(step, metrics)
            if final:
                self.recorder.event(
                    "eval.final", f"final evaluation after step {step} on {len(examples)} "
                    f"prompts: pass@1 {metrics['eval/pass@1']:.4f}, pass@{spec.pass_k} "
                    f"{metrics['eval/pass@k']:.4f}, reward mean {metrics['eval/reward_mean']:.4f}",
                    data={"step": step, "k": spec.pass_k, "prompts": len(examples), **metrics})
        self.watchdog.leave()

    def _record(self, step: int, slots: list[Slot],
                rollouts: list[Rollout], scores: Scores, stats: LearnStats,
                times: dict[str, float]) -> None:
        """The step's metrics and samples, over every rank's groups, each sample with its
        source (and with off-policy groups in the run, the reward of each source)."""
        rewards = scores.rewards  # (G, k)
        k = rewards.shape[1]
        sources = [slot_sources(group, k) for _, group in slots]
        lengths = [len(c.token_ids) for r in rollouts for c in r.completions]
        sampled = sum(len(c.token_ids) for (_, group), r in zip(slots, rollouts, strict=True)
                      for c in r.completions[k - sampled_by_run(group, k):])
        metrics = {
            "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
            "loss": stats.loss, "kl/ref": stats.kl_ref, "logratio/mean": stats.logratio_mean,
            "logratio/std": stats.logratio_std, "gvpo/residual_r2": stats.residual_r2,
            "entropy": stats.entropy, "grad_norm": stats.grad_norm,
            "lr": self.learner.lr_at(step), "response_length/mean": sum(lengths) / len(lengths),
            "groups/zero_variance_frac": stats.zero_variance_frac,
            "rollout/logprob_diff_max": stats.logprob_diff_max, **times,
            "throughput/tokens_per_s": sampled / max(sum(times.values()), 1e-9),
            **{f"reward/{label}/mean": part.mean().item()
               for label, part in scores.components.items()},
        }
        if self.spec.training.offpolicy_fraction:
            metrics |= per_source(rewards, sources)
            metrics["offpolicy/posted_groups"] = float(self.posted_taken)
        # Undefined values are left out rather than stored as NaN (R² when no group had spread).
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        samples = [
            {"group_index": g, "sample_index": i, "prompt": e.prompt, "completion": c.text,
             "answer": e.answer, "reward": float(rewards[g, i]), "source": sources[g][i]}
            for g, ((e, _), r) in enumerate(zip(slots, rollouts, strict=True))
            for i, c in enumerate(r.completions)
        ]
        self.recorder.record_step(step, metrics, samples, sampled)

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
        """The lead writes the checkpoint: the weights and optimizer state every rank holds
        (under FSDP gathered whole from the shards), and each rank's RNG state, so that a
        resumed rank samples as it would have."""
        self.watchdog.enter("checkpoint", step)
        rngs = self.ranks.gather(rng_state())
        model_state, optimizer_state = self.learner.checkpoint_state()
        self.checkpointed = step
        if not self.lead:
            return
        path = self.run_dir / "checkpoints" / f"step_{step:06d}"
        extra = {"data_cursor": self.sampler.cursor(), "spec": self.spec.model_dump()}
        if self.groups is not None:
            extra["offpolicy_cursor"] = self.groups.cursor()
        if self.ranks.world > 1:
            extra["rng_ranks"] = rngs
        size = save_checkpoint(path, self.model, self.tokenizer, step, extra, optimizer_state,
                               model_state)
        kind = "full" if self.spec.model.lora is None else "lora_adapter"
        where, store_url = str(path), self.settings.checkpoint_url
        if store_url:
            where = f"{store_url.rstrip('/')}/{self.recorder.run_id}/{path.name}"
            self._upload(step, path, where)
            # Workers' local disks are not shared: the API and the worker that resumes this run
            # read the store, so a local copy would only fill this machine's disk.
            shutil.rmtree(path, ignore_errors=True)
        self.recorder.record_checkpoint(step, where, size, kind, self.spec.checkpoint.keep_last)
        self.watchdog.leave()
