"""One run's training loop: rollout -> rewards -> learn -> publish -> record -> checkpoint,
each step (publishing the weights for serving every serving.sync_every_steps: publish.py).
With training.max_lag > 0 the rollouts and rewards of the next steps are produced on a thread
of their own while the learner trains (workers/ahead.py; the loop's side: run_ahead.py).

The process holds the model in memory for the whole run (execute.py claims the run and turns
how the loop ends into the run's outcome). Between steps the loop checks whether the lease was
lost or the user asked for a cancel or a pause; under data parallelism the lead decides and
every rank follows. Database access is the recorder's (records.py), checkpoint I/O
checkpointing.py's, and what a step reports step_metrics.py's.
"""

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import torch

from service.config import Settings
from service.contract.events import EventLevel, EventType
from service.contract.spec import RunSpec, offpolicy_per_engine
from service.contract.states import RunStatus
from workers.ahead import Produced, StopWaiting, decode, encode, without_dropout
from workers.chat import ChatTemplateError, Renderer
from workers.checkpointing import RunCheckpoints
from workers.data import Example, PromptSampler, load_examples
from workers.episodes import episode_runner
from workers.errors import RunError
from workers.evaluation import eval_metrics
from workers.heartbeat import Heartbeat
from workers.learner.checkpoint import load_training_state, restore_rng, rng_state
from workers.learner.learner import GroupBatch, Learner, LearnerConfig, LearnStats
from workers.model_loading import load_policy, pick_device, pick_dtype
from workers.model_source import fetch_hub_models
from workers.offpolicy import Slot, as_rollout, draw_slots, load_groups, sampled_by_run, score_slots
from workers.publish import WeightsPublisher, publishes, starts_as_its_model
from workers.ranks import Ranks
from workers.records import RunRecorder
from workers.rewards.base import Scores
from workers.rewards.graders import grading_context, record_errors
from workers.rewards.scoring import build_scorer
from workers.rewards.webhook import WebhookContext
from workers.rollout.base import Rollout, RolloutEngine
from workers.rollout.hf import HFRolloutEngine
from workers.rollout.inference import InferenceRolloutEngine
from workers.rollout.text import eos_token_ids
from workers.rollout.vllm import start_vllm
from workers.run_ahead import AheadSteps
from workers.step_metrics import step_record
from workers.watchdog import Watchdog

WAIT_POLL_S = 1.0  # training.wait_for_groups: how often a waiting step looks for groups


class LeaseLost(Exception):
    pass


class Cancelled(Exception):
    pass


class Paused(Exception):
    def __init__(self, step: int) -> None:
        super().__init__(f"paused after step {step}")
        self.step = step


class RunLoop(AheadSteps):
    def __init__(
        self,
        settings: Settings,
        recorder: RunRecorder,
        spec: RunSpec,
        heartbeat: Heartbeat | None,
        ranks: Ranks,
    ) -> None:
        """`heartbeat`: the lead's (lease and watchdog); None on the other ranks."""
        self.settings, self.recorder, self.spec, self.heartbeat = (
            settings,
            recorder,
            spec,
            heartbeat,
        )
        self.ranks, self.lead = ranks, ranks.lead
        self.watchdog = heartbeat.watchdog if heartbeat else Watchdog(None)
        self.checkpoints = RunCheckpoints(settings, recorder, ranks)

    # -- set-up ------------------------------------------------------------------------------

    def _setup(self) -> None:
        spec = self.spec
        torch.set_num_threads(self.settings.torch_threads)
        torch.manual_seed(spec.training.seed)
        random.seed(spec.training.seed)
        self.device = pick_device(spec)
        if self.lead:  # the attempt's device time counts from its claim, model load included
            self.recorder.start_spending(self.device.type, self.ranks.world)
        resume = self.checkpoints.latest()  # (step, path) when an earlier attempt died
        local = resume and self.checkpoints.resume_copy(*resume)
        self.spec = spec = fetch_hub_models(self.checkpoints.local_model(spec))
        self._load_model(local)
        if spec.training.max_lag:
            without_dropout(self.model)  # the learner draws no random numbers (workers/ahead.py)
        # The engine starts from spec.model.path: the same weights, unless resuming or going on
        # with an adapter.
        self.engine_stale = resume is not None or spec.model.adapter is not None
        self.learner = Learner(
            self.model,
            LearnerConfig.of(spec),
            self.device,
            self.tokenizer.pad_token_id,
            self._initial_model() if resume else None,
        )
        webhooks = WebhookContext.of_run(self.settings, self.recorder)
        self.scorer = (
            build_scorer(spec.reward, webhooks, grading_context(self.settings, self.recorder))
            if self.lead
            else None
        )
        self.renderer = Renderer(self.tokenizer, self.engine_eos, spec.model.chat_template)
        self.episodes = episode_runner(
            self.settings, self.recorder, spec, self.engine, self.renderer, self.model
        )
        self.diff_warn = spec.rollout.logprob_diff_warn or (
            1e-3 if pick_dtype(spec, self.device) == torch.float32 else 1.0
        )
        self.last_diff_warning: int | None = None
        self.start_step, self.checkpointed = 1, 0
        self.produced_ahead: dict[int, Produced] = {}  # restored from the checkpoint
        self._load_data()
        # Each engine samples its own completions; ranks sharing a tensor-parallel engine must
        # draw the same random numbers, or their shards would compute different sequences.
        if engine_group := self.ranks.engine:
            torch.manual_seed(spec.training.seed + engine_group)
            random.seed(spec.training.seed + engine_group)
        if resume:
            self._resume(*resume, local)
            self.checkpoints.done_with(resume[1], local)
        self.publisher = WeightsPublisher(self.settings, self.recorder, spec, self.lead)
        self.published: int | None = None  # the step this process last published
        self.ahead = self._start_ahead() if spec.training.max_lag else None
        if self.lead:
            self._announce()

    def _load_model(self, checkpoint) -> None:
        """The policy (from `checkpoint` when resuming) and the rollout engine."""
        spec = self.spec
        # vLLM first: it sizes its GPU share from the memory free when it starts.
        vllm_engine = start_vllm(
            spec, self.device, pick_dtype(spec, self.device), self.ranks, self._fallback
        )
        self.model, self.tokenizer = load_policy(spec, self.device, checkpoint)
        self.ranks.align(self.model)
        self.engine: RolloutEngine
        if spec.rollout.engine == "inference":
            self.engine = InferenceRolloutEngine(
                self.settings, self.recorder.run_id, spec, self.model, self.tokenizer
            )
        else:
            self.engine = vllm_engine or HFRolloutEngine(
                self.model,
                self.tokenizer,
                self.device,
                synced=spec.resources.strategy == "fsdp",
                own_copy=spec.training.max_lag > 0,  # it samples older weights than the learner's
            )
        self.engine_eos = eos_token_ids(self.model.generation_config.eos_token_id, self.tokenizer)
        self.eos_id = self.engine_eos[0]

    def _load_data(self) -> None:
        """The prompt sampler, the eval prompts and the off-policy groups of the spec's files."""
        spec = self.spec
        self.sampler = PromptSampler(self._examples("train_file"), spec.training.seed)
        self.eval_examples = (
            self._examples("eval_file")[: spec.eval.max_prompts] if spec.dataset.eval_file else []
        )
        self.groups = None
        if file_id := spec.dataset.offpolicy_file:
            rows = self.recorder.dataset_rows("offpolicy_file", file_id)
            self.groups = PromptSampler(
                self._groups(rows, "dataset.offpolicy_file"), spec.training.seed
            )

    def _groups(self, rows: list[dict], where: str) -> list:
        """Off-policy groups, a chat group's prompt rendered by the run's template."""
        try:
            return load_groups(rows, self.renderer)
        except ChatTemplateError as exc:
            raise RunError(f"{where}: {exc}") from None

    def _examples(self, field: str) -> list[Example]:
        ds = self.spec.dataset
        rows = self.recorder.dataset_rows(field, getattr(ds, field))
        examples = load_examples(rows, ds.prompt_field, ds.answer_field)
        try:  # a chat row's prompt, as samples and reward requests show it: rendered
            return [
                replace(e, prompt=self.renderer.prompt(e)[0]) if e.messages else e for e in examples
            ]
        except ChatTemplateError as exc:
            raise RunError(f"dataset.{field}: {exc}") from None

    def _initial_model(self):
        """reference="initial" after a resume: the starting weights, not the checkpoint's."""
        if self.spec.algorithm.reference != "initial" or self.spec.model.lora is not None:
            return None
        return load_policy(self.spec, self.device)[0]

    def _resume(self, step: int, path: str, local) -> None:
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
        self.produced_ahead = {
            int(s): self._own_part(decode(p)) for s, p in state.get("ahead", {}).items()
        }
        if self.lead:
            self.recorder.event(
                EventType.RUN_RESUMED,
                f"resumed from the checkpoint at step {step}",
                data={"step": step},
            )

    def _announce(self) -> None:
        world = self.ranks.world
        where = f"{world} processes on {self.device}" if world > 1 else str(self.device)
        self.recorder.event(
            EventType.RUN_MODEL_LOADED,
            f"loaded the model on {where}; rollouts with {self.engine.name}",
            data={
                "device": str(self.device),
                "rollout_engine": self.engine.name,
                "ranks": world,
                "parameters": sum(p.numel() for p in self.model.parameters()),
            },
        )

    def _fallback(self, why: str) -> None:
        if self.lead:
            self.recorder.event(
                EventType.ROLLOUT_FALLBACK,
                f"vLLM could not start ({why}); rolling out with transformers",
                EventLevel.WARNING,
            )

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        self._setup()
        total = self.spec.training.steps
        every = self.spec.checkpoint.every_steps
        try:
            self._publish_start()
            for step in range(self.start_step, total + 1):
                self._check_control(step - 1)
                self._step(step)
                if self.eval_examples and (step % self.spec.eval.every_steps == 0 or step == total):
                    self._evaluate(step, final=step == total)
                if step % every == 0 or step == total:
                    self._checkpoint(step)
        finally:
            if self.ahead is not None:
                self.ahead.close()  # after the job it runs now: it may be using the engine
            if self.episodes is not None:
                self.episodes.environment.close()
            self.engine.close()
        if self.lead:
            self.recorder.finish(RunStatus.SUCCEEDED, f"run finished after {total} steps")

    def _check_control(self, done: int) -> None:
        """Between steps (`done` steps finished): stop if the lease was lost or the user asked
        (the lead looks; every rank follows)."""
        self._follow(self.ranks.share(self._stop_request() if self.lead else None), done)

    def _stop_request(self) -> str | None:
        """The lead's look: "lost" (the lease), "cancel" or "pause" (the user), or None."""
        return "lost" if self.heartbeat.lost.is_set() else self.recorder.requested_stop()

    def _follow(self, stop: str | None, done: int) -> None:
        """Stop as the lead decided, `done` steps finished. A pause first checkpoints the last
        finished step, unless one is already there."""
        if stop == "lost":
            raise LeaseLost()
        if stop == "cancel":
            raise Cancelled()
        if stop == "pause":
            if done and done != self.checkpointed:
                self._checkpoint(done)
            raise Paused(done)

    @contextmanager
    def _phase(
        self, name: str, step: int, times: dict[str, float], watched: bool = True
    ) -> Iterator[None]:
        """One phase of a step: watched by the step watchdog (the main thread's phases), timed
        as time/<name>_s."""
        if watched:
            self.watchdog.enter(name, step)
        start = time.perf_counter()
        yield
        times[f"time/{name}_s"] = time.perf_counter() - start

    def _step(self, step: int) -> None:
        if self.ahead is not None:
            return self._step_ahead(step)
        times: dict[str, float] = {}
        produced = self._produce(step, times, self.ranks)
        self._train(step, produced, times)

    def _produce(
        self, step: int, times: dict[str, float], ranks: Ranks, watched: bool = True
    ) -> Produced:
        """Step `step`'s groups: drawn, rolled out and rewarded, exchanged between the
        processes over `ranks` (`watched`: by the main thread, in the watchdog's phases)."""
        slots = self._draw(step, ranks)  # the same on every rank
        if watched:
            with self._phase("weight_sync", step, times):
                k = self.spec.algorithm.group_size
                if any(sampled_by_run(group, k) for _, group in slots):  # whole groups: none
                    self._sync_engine()  # once per step: nothing samples between its updates
        with self._phase("rollout", step, times, watched):
            rollouts, mine = self._roll_out(step, slots, ranks)
        with self._phase("reward", step, times, watched):
            scores = self._rewards(step, slots, rollouts, ranks)
        environment_s = 0.0
        if self.episodes is not None:  # part of time/rollout_s: the environment's answers
            environment_s, self.episodes.environment_s = self.episodes.environment_s, 0.0
        return Produced(
            slots,
            rollouts,
            scores,
            version=step - 1,
            times=times,
            posted=self.posted_taken,
            environment_s=environment_s,
            mine=mine,
        )

    def _train(
        self,
        step: int,
        produced: Produced,
        times: dict[str, float],
        extra: dict | None = None,
        started: float | None = None,
    ) -> None:
        """Learn from a step's groups, publish, record (`extra`: metrics to add; `started`: an
        async step's start, for its time/step_s)."""
        with self._phase("learn", step, times):
            stats = self._learn(step, produced)
        if self._publishes(step):
            with self._phase("publish", step, times):
                self._publish(step)
        self.watchdog.leave()
        if self.lead:
            if started is not None:
                times["time/step_s"] = time.perf_counter() - started
            self._record(step, produced, stats, times, extra or {})
            self._warn_on_drift(step, stats.logprob_diff_max)

    def _draw(self, step: int, ranks: Ranks) -> list[Slot]:
        """The step's prompts and off-policy groups (posted to the run first, then the file's)."""
        training, engines = self.spec.training, ranks.engines
        off = offpolicy_per_engine(training, engines) if training.offpolicy_fraction else 0
        posted = self._posted(step, off * engines, engines, ranks) if off else []
        posted = self._groups(posted, "a group posted to the run")
        self.posted_taken = len(posted)
        return draw_slots(
            self.sampler, self.groups, posted, off, training.prompts_per_step, engines
        )

    def _posted(self, step: int, most: int, engines: int, ranks: Ranks) -> list[dict]:
        """Groups posted to the run for the step's `most` off-policy slots: the lead reads them
        and every rank gets them. With training.wait_for_groups the step waits until posted
        groups fill every slot, polling every WAIT_POLL_S; meanwhile a cancel, a pause or a lost
        lease stops the run at once (the lead decides at each poll, and every rank follows, so
        no rank sits in a collective for long). The wait is in no phase of the step: the
        watchdog never times out a run waiting for an agent."""
        whole, waiting = self.spec.training.wait_for_groups, False
        while True:
            kind, value = ranks.lead_computes(
                partial(self._groups_or_stop, step, most, engines, whole, waiting)
            )
            if kind == "groups":
                if self.ahead is not None:
                    self.ahead.waiting_for_groups = False
                return value
            if value and self.ahead is not None:  # the producer's: the learner stops the run
                raise StopWaiting(value)
            self._follow(value, step - 1)
            waiting = True
            if self.ahead is not None:
                self.ahead.waiting_for_groups = True
            time.sleep(WAIT_POLL_S)

    def _groups_or_stop(
        self, step: int, most: int, engines: int, whole: bool, waiting: bool
    ) -> tuple[str, list[dict] | str | None]:
        """The lead's decision at one poll: ("groups", the groups taken), or ("wait", what
        stops the run, if anything). The first wait of a step is announced in an event."""
        taken = self.recorder.take_groups(step, most, engines, whole)
        if taken or not whole:
            return "groups", taken
        if not waiting:
            pending = self.recorder.pending_groups(step)
            self.recorder.event(
                EventType.RUN_WAITING_FOR_GROUPS,
                f"step {step} waits for groups posted to the run: {pending} of the {most} "
                "it trains on are there (training.wait_for_groups)",
                data=dict(step=step, pending=pending, needed=most),  # as GET .../groups counts
            )
        return "wait", self._stop_request()

    def _roll_out(
        self, step: int, slots: list[Slot], ranks: Ranks
    ) -> tuple[list[Rollout], list[Rollout]]:
        """(every group's rollout, on the lead; this rank's groups' rollouts). This rank's engine
        samples fresh completions for its share's prompts; off-policy groups come as given
        (one of fewer than k topped up with fresh ones)."""
        k = self.spec.algorithm.group_size
        share = ranks.engine_share(slots)
        fresh = [i for i, (_, group) in enumerate(share) if sampled_by_run(group, k)]
        made = iter(self._generate(step, [share[i][0] for i in fresh], k, groups=fresh))
        try:
            generated = [
                next(made)
                if group is None
                else as_rollout(
                    group,
                    self.tokenizer,
                    self.eos_id,
                    next(made) if sampled_by_run(group, k) else None,
                    self.renderer,
                )
                for _, group in share
            ]
        except ChatTemplateError as exc:
            raise RunError(f"an off-policy group: {exc}") from None
        self.engine.offload()
        return ranks.gather_engines(generated), ranks.own_part(generated)

    def _generate(
        self,
        step: int,
        examples: list[Example],
        n: int,
        purpose: str = "train",
        groups: list[int] | None = None,
    ) -> list[Rollout]:
        """n completions of each example, or n episodes with an environment."""
        if not examples:
            return []
        if self.episodes is not None:
            try:
                return self.episodes.run(step, examples, n, self.spec.sampling, purpose, groups)
            except ChatTemplateError as exc:
                raise RunError(str(exc)) from None
        prompts = [self.renderer.prompt(e)[1] for e in examples]
        return self.engine.generate(prompts, n, self.spec.sampling)

    def _rewards(
        self, step: int, slots: list[Slot], rollouts: list[Rollout], ranks: Ranks
    ) -> Scores:
        """(G, k) rewards of every group, scored once by the lead and shared with every rank."""
        return ranks.lead_computes(lambda: score_slots(self.scorer, step, slots, rollouts))

    def _batch(self, mine: list[Rollout], rewards: torch.Tensor) -> GroupBatch:
        reported = any(c.logprobs is not None for r in mine for c in r.completions)
        masked = any(c.mask is not None for r in mine for c in r.completions)
        segmented = any(c.segments is not None for r in mine for c in r.completions)
        return GroupBatch(
            [r.prompt_ids for r in mine],
            [[c.token_ids for c in r.completions] for r in mine],
            rewards,
            [[c.logprobs for c in r.completions] for r in mine] if reported else None,
            [[c.mask for c in r.completions] for r in mine] if masked else None,
            [[c.segments for c in r.completions] for r in mine] if segmented else None,
        )

    def _own_batch(self, produced: Produced) -> GroupBatch:
        """This rank's groups of a step."""
        rewards = self.ranks.shard(produced.scores.rewards)  # (G / ranks, k)
        return self._batch(produced.rollouts if produced.mine is None else produced.mine, rewards)

    def _learn(self, step: int, produced: Produced) -> LearnStats:
        """One learner step on this rank's groups (statistics summed over the ranks)."""
        batch = self._own_batch(produced)
        if self.ahead is not None:
            # The sampling policy's log-probs: computed at a checkpoint, or now by the learner
            # (its side of the overlap is usually the shorter) for the groups it trains, part
            # of time/learn_s. pi_ref's, where the rollout thread computed them.
            batch.behaviour_logps = produced.behaviour
            batch.reference_logps = produced.reference
            if (snapshot := self.sampled_with.pop(step, None)) and produced.behaviour is None:
                batch.sampling_weights = snapshot.trained
            if not batch.lagged:  # the engine's log-probs are checked against those only
                batch.sampling_logps = None
        stats = self.learner.learn(batch, step)
        if self.ranks.world > 1:  # every rank's groups' per-completion values, on the lead
            parts = self.ranks.gather((stats.logratios, stats.weights))
            if parts is not None:
                stats = replace(
                    stats,
                    logratios=[row for logratios, _ in parts for row in logratios],
                    weights=[row for _, weights in parts for row in weights],
                )
        self.engine_stale |= stats.updates > 0  # a step that trained no group changed nothing
        if not math.isfinite(stats.loss):
            raise RunError(
                f"training diverged: the loss is {stats.loss} at step {step}; "
                "try a lower optimizer.lr or a larger algorithm.beta"
            )
        return stats

    def _record(
        self,
        step: int,
        produced: Produced,
        stats: LearnStats,
        times: dict[str, float],
        extra: dict[str, float],
    ) -> None:
        """`extra`: an async step's metrics."""
        posted = produced.posted if self.spec.training.offpolicy_fraction else None
        slots, rollouts, scores = produced.slots, produced.rollouts, produced.scores
        record = step_record(
            step, slots, rollouts, scores, stats, self.learner.lr_at(step), times, posted
        )
        record.metrics.update(extra)
        if self.episodes is not None:  # part of time/rollout_s: the environment's answers
            record.metrics["time/environment_s"] = produced.environment_s
        self.recorder.spent(
            tokens_generated=record.tokens_generated, tokens_trained=record.tokens_trained
        )
        self.recorder.record_step(
            step, record.metrics, record.samples, record.tokens_generated, self.spec.retention
        )
        record_errors(self.recorder, step, scores.errors, len(record.samples), "train")

    def _publish_start(self) -> None:
        """The weights the run starts from, for serving: step 0's (a fresh run's model folder as
        it is, when nothing changed it: recorded whether asked for or not, as it costs
        nothing), or those of the checkpoint it resumed from (when its model is asked for)."""
        if not self.spec.serving.sync_every_steps:
            return
        step = self.start_step - 1
        self.watchdog.enter("publish", step)
        if step == 0 and starts_as_its_model(self.spec):
            self.publisher.publish_start()
            self.published = 0
        elif self._asked():
            self._publish(step)
        self.watchdog.leave()

    def _publishes(self, step: int) -> bool:
        """Whether to publish after `step`: when its model has been asked for, at the steps
        publishes() names, and after the first step since it was asked for if this process
        has published nothing yet."""
        if not self.spec.serving.sync_every_steps:
            return False
        due = publishes(self.spec, step) or self.published is None
        return due and self._asked()

    def _asked(self) -> bool:
        """Whether a request has named the run as its model (the lead looks; every rank
        follows)."""
        return self.ranks.share(self.recorder.serving_asked() if self.lead else None)

    def _publish(self, step: int) -> None:
        sharded = self.learner.collective.sharded  # every rank gathers, the lead writes
        self.publisher.publish(step, self.model, self.tokenizer, gather=sharded)
        self.published = step

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
        if self.ahead is not None:  # the producer is done with the engine until the next job
            self._quiesce(step)
            self._sample_with(self._snapshot(step))
        else:
            self._sync_engine()
        padded = examples + examples[-1:] * (-len(examples) % self.ranks.engines)  # equal shares
        generated = self._generate(
            step, self.ranks.engine_share(padded), spec.samples_per_prompt, "eval"
        )
        self.engine.offload()
        if self.episodes is not None:
            self.episodes.environment_s = 0.0  # the step's figure is the training rollout's
        rollouts = self.ranks.gather_engines(generated)[: len(examples)]
        if self.lead:
            slots = [(e, None) for e in examples]  # an episode keeps its environment's reward
            scores = score_slots(self.scorer, step, slots, rollouts, purpose="eval")
            metrics = eval_metrics(scores.rewards, spec.pass_threshold, spec.pass_k)
            self.recorder.record_metrics(step, metrics)
            record_errors(self.recorder, step, scores.errors, scores.rewards.numel(), "eval")
            if final:
                self.recorder.event(
                    EventType.EVAL_FINAL,
                    f"final evaluation after step {step} on "
                    f"{len(examples)} prompts: pass@1 {metrics['eval/pass@1']:.4f}, "
                    f"pass@{spec.pass_k} {metrics['eval/pass@k']:.4f}, reward mean "
                    f"{metrics['eval/reward_mean']:.4f}",
                    data={"step": step, "k": spec.pass_k, "prompts": len(examples), **metrics},
                )
        self.watchdog.leave()

    def _warn_on_drift(self, step: int, diff: float) -> None:
        """The engine sampled from weights other than the learner's (at most one warning per
        100 steps, so a persistent drift does not flood the event log)."""
        if not diff > self.diff_warn:  # NaN: nothing to compare
            return
        if self.last_diff_warning is not None and step - self.last_diff_warning < 100:
            return
        self.last_diff_warning = step
        self.recorder.event(
            EventType.ROLLOUT_LOGPROB_MISMATCH,
            f"step {step}: {self.engine.name}'s log-probs for the sampled tokens differ from the "
            f"learner's by up to {diff:.3g} (warning above {self.diff_warn:g}); the rollout "
            "weights may be out of sync with the policy",
            EventLevel.WARNING,
            {"step": step, "logprob_diff_max": diff, "threshold": self.diff_warn},
        )

    def _checkpoint(self, step: int) -> None:
        """The lead writes the checkpoint: the weights and optimizer state every rank holds
        (under FSDP gathered whole from the shards), and each rank's RNG state, so that a
        resumed rank samples as it would have."""
        self.watchdog.enter("checkpoint", step)
        # before the RNG and the cursors (the producer's)
        ahead = self._joined(self._quiesce(step, keep=True))
        rngs = self.ranks.gather(rng_state())
        model_state, optimizer_state = self.learner.checkpoint_state()
        self.checkpointed = step
        if not self.lead:
            return
        extra = {"data_cursor": self.sampler.cursor(), "spec": self.spec.model_dump()}
        if self.groups is not None:
            extra["offpolicy_cursor"] = self.groups.cursor()
        if self.ranks.world > 1:
            extra["rng_ranks"] = rngs
        if self.ahead is not None:
            extra["ahead"] = {str(s): encode(p) for s, p in ahead.items()}
        self.checkpoints.save(
            step, self.spec, self.model, self.tokenizer, extra, optimizer_state, model_state
        )
        self.watchdog.leave()
