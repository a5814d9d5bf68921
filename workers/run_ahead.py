"""The run loop's async steps (training.max_lag > 0; workers/ahead.py has the schedule and the
producer thread): RunLoop's methods that hand the producer snapshots of the weights, take each
step's groups from it, wait for the jobs in flight at a checkpoint or an evaluation, and keep
the steps in flight in checkpoints (under data parallelism, every process's part).
"""

import time
from dataclasses import replace

from workers.ahead import Produced, RolloutsAhead, Snapshot, StopWaiting
from workers.rollout.hf import HFRolloutEngine

TAKE_POLL_S = 1.0  # how often the learner, waiting for a step's groups, looks at the producer


class AheadSteps:
    """Mixed into RunLoop (workers/run_loop.py), whose state these methods share."""

    def _start_ahead(self) -> RolloutsAhead:
        """The producer of an async run's steps (workers/ahead.py)."""
        self.engine_version = None if self.engine_stale else self.start_step - 1
        # the snapshot each step in flight was sampled with, until the learner has the
        # sampling policy's log-probs from it (when it needs them)
        self.sampled_with: dict[int, Snapshot] = {}
        self.snapshot: Snapshot | None = None
        # the producer's prompts, rollouts and rewards go between the ranks over a group of
        # their own, while the learner's gradients go over the default one
        self.producer_ranks = self.ranks.on_own_group()
        ahead = RolloutsAhead(
            self._produce_ahead, self.settings.rollout_threads or self.settings.torch_threads
        )
        ahead.restore(self.produced_ahead)
        return ahead

    def _own_part(self, produced: Produced) -> Produced:
        """A step in flight as the checkpoint saved it (every group's), as this rank produced
        it: its own groups' rollouts and log-probs (Ranks.shard's part)."""
        if self.ranks.world == 1:
            return produced

        def own(rows: list | None) -> list | None:
            return None if rows is None else self.ranks.shard(rows)

        return replace(
            produced,
            mine=own(produced.rollouts),
            behaviour=own(produced.behaviour),
            reference=own(produced.reference),
        )

    def _step_ahead(self, step: int) -> None:
        """Hand the producer the weights after step-1 for step step+max_lag (at the start, for
        every step up to it), take step `step`'s groups, train."""
        started = time.perf_counter()
        last = min(step + self.spec.training.max_lag, self.spec.training.steps)
        if self.ahead.submitted < last:
            snapshot = self._snapshot(step - 1)
            for later in range(self.ahead.submitted + 1, last + 1):
                self.ahead.submit(later, snapshot)
        idle = time.perf_counter()
        try:
            produced = self._take(step)
        except StopWaiting as stop:  # asked while it waited for posted groups
            self._follow(stop.stop, step - 1)
            raise
        idle = time.perf_counter() - idle
        times = dict(produced.times)
        extra = {
            "async/lag_mean": float(step - 1 - produced.version),
            "async/learner_idle_s": idle,
            "async/rollout_idle_s": self.ahead.idle_s,
        }
        self.ahead.idle_s = 0.0
        self._train(step, produced, times, extra, started)

    def _take(self, step: int) -> Produced:
        """Step `step`'s groups, waited for in the watchdog's rollout phase (a producer that
        hangs fails the run as in the synchronous loop), except while the producer waits for
        groups posted to the run, which is no phase (training.wait_for_groups)."""
        watched = False
        while True:
            if self.ahead.waiting_for_groups == watched:  # the phase starts or stops
                watched = not watched
                if watched:
                    self.watchdog.enter("rollout", step)
                else:
                    self.watchdog.leave()
            try:
                return self.ahead.take(step, timeout=TAKE_POLL_S)
            except TimeoutError:
                continue

    def _snapshot(self, version: int) -> Snapshot:
        """The learner's weights now (after step `version`), copied once for every job that
        samples with them."""
        if self.snapshot is None or self.snapshot.version != version:
            engine = self.engine.snapshot(self.model)
            trained = None
            if self.learner.needs_behaviour:  # the transformers engine's snapshot is just that
                same = isinstance(self.engine, HFRolloutEngine) and not self.learner.sharded
                trained = engine if same else self.learner.trained_copy()
            self.snapshot = Snapshot(version, engine, trained)
        return self.snapshot

    def _sample_with(self, snapshot: Snapshot) -> None:
        """Load the engine with a snapshot's weights, unless it holds them (the producer's, or
        the learner's while none runs)."""
        if self.engine_version != snapshot.version:
            self.engine.load_snapshot(snapshot.engine)
            self.engine_version = snapshot.version

    def _produce_ahead(self, step: int, snapshot: Snapshot) -> Produced:
        """The producer's job for step `step` (on its thread)."""
        times: dict[str, float] = {}
        with self._phase("weight_sync", step, times, watched=False):
            self._sample_with(snapshot)
        produced = self._produce(step, times, self.producer_ranks, watched=False)
        produced.version = snapshot.version
        if self.ranks.world == 1:
            produced.mine = None  # every group's: kept once
        if snapshot.trained is not None:
            self.sampled_with[step] = snapshot
        if self.learner.frozen_reference:
            with self._phase("reference", step, times, watched=False):
                produced.reference = self.learner.reference_logps(self._own_batch(produced))
        return produced

    def _behaviour(self, step: int, produced: Produced) -> None:
        """Give a step in flight the sampling policy's log-probs, when the learner needs them
        (a checkpoint keeps no snapshot): computed with the snapshot that sampled the step
        put in the policy's place."""
        snapshot = self.sampled_with.pop(step, None)
        if produced.behaviour is None and snapshot is not None:
            batch = self._own_batch(produced)
            produced.behaviour = self.learner.behaviour_logps(snapshot.trained, batch)

    def _quiesce(self, step: int, keep: bool = False) -> dict[int, Produced]:
        """Wait for every job in flight (a checkpoint or an evaluation after step `step`); the
        steps produced after it, up to the first that failed (`keep`: to be saved, with their
        sampling policy's log-probs)."""
        if self.ahead is None:
            return {}
        done = self.ahead.drain()
        failure = self.ahead.failure()
        if self.ranks.world > 1 and failure and not isinstance(failure, StopWaiting):
            # this rank's producer failed (not on a stop, which every rank's gets alike): the
            # other ranks' producers wait for it in their collectives, so fail now rather
            # than checkpoint
            raise failure
        for later, produced in done.items() if keep else ():
            self._behaviour(later, produced)
        return {s: p for s, p in done.items() if s > step}

    def _joined(self, ahead: dict[int, Produced]) -> dict[int, Produced]:
        """The steps in flight as the lead saves them: under data parallelism each rank's
        log-probs of its own groups, joined in rank order (Ranks.shard's) on the lead; {} on
        the other ranks."""
        if self.ranks.world == 1:
            return ahead
        parts = self.ranks.gather({s: (p.behaviour, p.reference) for s, p in ahead.items()})
        if not self.lead:
            return {}

        def joined(step: int, which: int) -> list | None:
            if parts[0][step][which] is None:
                return None
            return [row for part in parts for row in part[step][which]]

        return {
            s: replace(p, mine=None, behaviour=joined(s, 0), reference=joined(s, 1))
            for s, p in ahead.items()
        }
