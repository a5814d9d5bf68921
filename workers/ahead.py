"""Async GVPO (training.max_lag = N > 0): steps' groups are produced on a thread of their own
while the learner trains the steps before them (DESIGN.md §v2.4).

The schedule is fixed, so that a run resumed from a checkpoint goes on exactly as one that never
stopped: step t's groups are sampled with the weights after step max(0, t-1-N), and rewarded,
while the learner trains steps t-N .. t-1. At the top of step t the learner hands the producer a
snapshot of its weights (after step t-1) for step t+N, then takes step t's groups.

- One producer thread runs the jobs in step order: load the snapshot into the engine (unless it
  is already there), draw the step's prompts and groups, roll out, reward. It owns the rollout
  engine, the prompt sampler and the random number generators between the learner's
  checkpoints; the learner draws no random numbers (its dropout is switched off), so what the
  producer samples does not depend on how the two threads interleave.
- Where the learner needs the sampling policy's own log-probs (reference "sampling", and the
  GRPO baselines' ratios), the learner computes them with the snapshot that sampled the step
  put in the policy's place (torch.func.functional_call): exact, whatever the engine reports.
  The rollout side is usually the longer of the two, so the extra forward pass goes to the
  learner; a checkpoint computes them for the steps in flight, as it keeps no snapshot.
- With reference "initial" and a frozen copy of the starting model (no LoRA), the producer
  also computes pi_ref's log-probs of each step: the copy never changes, so the learner's
  updates cannot race with it, and the learner is left the policy's passes alone.
- A checkpoint (and an evaluation, and a pause) first waits for every job in flight; the groups
  already produced for the steps after the checkpoint are saved in it (as JSON) and taken up
  again on resume, so the resumed run trains exactly what the uninterrupted one would have.
- Under data parallelism every process runs its own producer, which exchanges with the
  others' over a process group of its own (Ranks.on_own_group); a checkpoint joins every
  process's groups in flight on the lead, and each takes its own part back on resume.
- A job that fails (a reward webhook that never answers, a stop asked while waiting for posted
  groups) fails every job after it: the learner sees the failure when it takes that step.
"""

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, fields, is_dataclass

import torch

from workers.data import Example
from workers.offpolicy import Group, Slot
from workers.rewards.base import GradingErrors, Scores
from workers.rollout.base import Completion, Rollout, Segment, Turn


@dataclass
class Produced:
    """A step's groups as the rollout side made them, ready for the learner."""

    slots: list[Slot]
    rollouts: list[Rollout]  # every group's
    scores: Scores
    version: int  # the step whose weights sampled them (0: the starting weights)
    times: dict[str, float] = field(default_factory=dict)  # time/<phase>_s of the producer
    posted: int = 0  # groups posted to the run that the step took
    environment_s: float = 0.0  # time the environment took to answer (episodes)
    mine: list[Rollout] | None = None  # this rank's groups' rollouts (None: every group's)
    # (G, k, tokens): each completion's token log-probs under the weights that sampled it,
    # computed by the learner's code (None: the learner does not need them)
    behaviour: list[list[list[float]]] | None = None
    # (G, k, tokens): pi_ref's token log-probs, where pi_ref is a frozen copy of the starting
    # model (computed on the rollout side, which is usually the less loaded; None: not)
    reference: list[list[list[float]]] | None = None


@dataclass(frozen=True)
class Snapshot:
    """The learner's weights after step `version`, copied for the producer."""

    version: int
    engine: object  # what the engine loads (RolloutEngine.snapshot)
    # the policy's trained parameters, for the sampling policy's log-probs (None: not needed)
    trained: dict[str, torch.Tensor] | None


class StopWaiting(Exception):
    """Raised by a job waiting for posted groups when the run is asked to stop ("cancel",
    "pause") or lost its lease ("lost"); the learner then stops as it would have."""

    def __init__(self, stop: str) -> None:
        super().__init__(stop)
        self.stop = stop


class EarlierJobFailed(Exception):
    """A job not run because one before it failed."""


class RolloutsAhead:
    """The producer thread and the jobs submitted to it, one per step, in step order."""

    def __init__(self, produce: Callable[[int, Snapshot], Produced], threads: int) -> None:
        """`produce(step, snapshot)` makes a step's groups with the snapshot's weights;
        `threads`: torch's intra-op threads for the producer (its share of the budget)."""
        self.produce, self.threads = produce, threads
        self.jobs: queue.Queue = queue.Queue()
        self.futures: dict[int, Future] = {}
        self.submitted = 0  # the last step submitted (or restored)
        self.idle_s = 0.0  # time the producer waited for a job since the last take()
        self.waiting_for_groups = False  # a job waits for groups posted to the run
        self.failed = False
        self.thread = threading.Thread(target=self._serve, name="gvpo-rollouts", daemon=True)
        self.thread.start()

    def restore(self, produced: dict[int, Produced]) -> None:
        """Steps produced before a checkpoint, taken up on resume."""
        for step, done in sorted(produced.items()):
            future: Future = Future()
            future.set_result(done)
            self.futures[step] = future
            self.submitted = max(self.submitted, step)

    def submit(self, step: int, snapshot: Snapshot) -> None:
        future: Future = Future()
        self.futures[step] = future
        self.submitted = step
        self.jobs.put((step, snapshot, future))

    def take(self, step: int, timeout: float | None = None) -> Produced:
        """Step `step`'s groups, once produced (re-raising the job's failure); TimeoutError
        when they are not there within `timeout` seconds (ask again)."""
        future = self.futures[step]
        try:
            return future.result(timeout)
        finally:
            if future.done():
                del self.futures[step]

    def drain(self) -> dict[int, Produced]:
        """Wait for every job in flight; the steps produced and not yet taken, up to the first
        that failed (its failure stays for take())."""
        done = {}
        for step, future in sorted(self.futures.items()):
            try:
                done[step] = future.result()
            except Exception:
                break
        return done

    def failure(self) -> BaseException | None:
        """The failure of the first job that failed, among those not taken yet."""
        for _, future in sorted(self.futures.items()):
            if future.done() and future.exception() is not None:
                return future.exception()
        return None

    def close(self) -> None:
        """Stop after the job running now (the engine may be released only then)."""
        self.failed = True  # every job still queued is skipped
        self.jobs.put(None)
        self.thread.join()

    def _serve(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's own OpenMP team
        while True:
            waited = time.perf_counter()
            job = self.jobs.get()
            self.idle_s += time.perf_counter() - waited
            if job is None:
                return
            step, snapshot, future = job
            if self.failed:
                future.set_exception(EarlierJobFailed(f"step {step}: an earlier step failed"))
                continue
            try:
                future.set_result(self.produce(step, snapshot))
            except BaseException as exc:  # handed to the learner, which fails the run with it
                self.failed = True
                future.set_exception(exc)


def without_dropout(model) -> None:
    """Switch off the model's dropout, so that the learner draws no random numbers (the
    producer's sampling then does not depend on how the two threads interleave)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


# -- groups produced ahead, in a checkpoint ------------------------------------------------------

_TYPES = {
    cls.__name__: cls
    for cls in (Produced, Example, Group, Rollout, Completion, Turn, Segment, Scores, GradingErrors)
}


def encode(value):
    """Produced (and what it holds) as JSON: dataclasses by type name, tensors as lists."""
    if is_dataclass(value):
        return {
            "__type__": type(value).__name__,
            **{f.name: encode(getattr(value, f.name)) for f in fields(value)},
        }
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


def decode(value):
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
    if "__tuple__" in value:
        return tuple(decode(v) for v in value["__tuple__"])
    if "__type__" in value:
        cls = _TYPES[value["__type__"]]
        return cls(**{k: decode(v) for k, v in value.items() if k != "__type__"})
    return {k: decode(v) for k, v in value.items()}
