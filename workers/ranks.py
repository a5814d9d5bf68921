"""A run's training processes (data-parallel ranks) and what they exchange each step.

A run with resources.ranks > 1 is one process per rank, started by torchrun (see launcher.py).
Every rank holds a full copy of the policy and its own rollout engine. Each step all ranks draw
the same prompts from the seeded sampler and each rolls out its own contiguous share; the
completions are gathered to rank 0, which scores them once (one reward request per step, as in
one process) and shares the rewards back. Each rank then trains its own whole groups: the
learner sums group counts and gradients across ranks, so the update is the one a single process
would make on all the groups. Rank 0 (the lead) is the only one that writes to the database.

With vLLM tensor parallel (rollout.tensor_parallel_size = tp > 1) each run of tp consecutive
ranks shares one sharded engine, so those ranks roll out the same prompts and get the same
completions; each of them then trains its own part of them, and rank 0 keeps one copy.

An async run (training.max_lag) produces its steps on a thread of each process: that thread's
prompts, completions and rewards go over a process group of its own (on_own_group), while the
learner's gradients go over the default one. What the lead computes for every rank
(lead_computes) is shared even when it fails, so that no rank waits for it.

In one process the same calls cost nothing: gather returns [obj] and share returns obj.
"""

import os
import pickle
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from workers.errors import RunError

T = TypeVar("T")


def _part(items: list[T], parts: int, index: int) -> list[T]:
    """The index-th of `parts` equal contiguous parts (len(items) is a multiple of parts)."""
    size = len(items) // parts
    return items[index * size : (index + 1) * size]


class Ranks:
    def __init__(
        self,
        rank: int = 0,
        world: int = 1,
        tp: int = 1,
        timeout: timedelta | None = None,
        nodes: int = 1,
    ) -> None:
        self.rank, self.world, self.tp, self.timeout = rank, world, tp, timeout
        self.nodes = nodes  # the machines the ranks run on (a gang when more than one)
        self.group = None  # the process group of gather() and share() (None: the default)

    def on_own_group(self) -> "Ranks":
        """The same ranks exchanging over a process group of their own (gloo: gather() and
        share() move Python objects), for another thread's collectives: an async run's
        producer shares prompts and rewards while the learner reduces gradients, and two
        threads' collectives on one group would interleave. Every rank calls it, in the same
        order."""
        if self.world == 1:
            return self
        other = Ranks(self.rank, self.world, self.tp, self.timeout, self.nodes)
        other.group = dist.new_group(backend="gloo", timeout=self.timeout)
        return other

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def engines(self) -> int:
        """Rollout engines: one per tensor-parallel group of ranks."""
        return self.world // self.tp

    @property
    def engine(self) -> int:
        """The index of this rank's rollout engine."""
        return self.rank // self.tp

    def shard(self, items: list[T]) -> list[T]:
        """This rank's contiguous share (len(items) is a multiple of the world size)."""
        return _part(items, self.world, self.rank)

    def engine_share(self, items: list[T]) -> list[T]:
        """What this rank's rollout engine (shared by its tensor-parallel group) generates."""
        return _part(items, self.engines, self.engine)

    def own_part(self, generated: list[T]) -> list[T]:
        """This rank's part of its engine's output: shard() of the whole step."""
        return _part(generated, self.tp, self.rank % self.tp)

    def gather_engines(self, generated: list[T]) -> list[T]:
        """Every engine's output once, in prompt order, on the lead; [] elsewhere."""
        parts = self.gather(generated)
        return [item for part in parts[:: self.tp] for item in part] if parts else []

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's `obj` in rank order on the lead; None elsewhere."""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.lead else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def share(self, obj: T) -> T:
        """The lead's `obj` on every rank (what the other ranks pass is ignored)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def lead_computes(self, compute: Callable[[], T]) -> T:
        """The lead's `compute()` on every rank. What it raises is raised on every rank (as a
        RunError with its message where the exception cannot be pickled), so that no rank
        waits for a result that never comes."""
        if self.world == 1:
            return compute()
        outcome: tuple[str, Any] | None = None
        if self.lead:
            try:
                outcome = ("done", compute())
            except Exception as exc:
                outcome = ("raised", exc if _picklable(exc) else RunError(str(exc)))
                self.share(outcome)
                raise
        kind, value = self.share(outcome)
        if kind == "raised":
            raise value
        return value

    @torch.no_grad()
    def align(self, model) -> None:
        """Start every rank from the lead's weights (a fresh LoRA adapter is randomly
        initialised in each process)."""
        if self.world == 1:
            return
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def _picklable(value: object) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def join(step_timeout_s: float | None, tp: int) -> Ranks:
    """Join the process group torchrun set up for this process (gloo on CPU, NCCL on GPUs).

    A collective waits while the lead scores the step's completions, which may take up to the
    step timeout with a slow reward model, so the group's timeout is longer than that.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    nodes = world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    timeout = timedelta(seconds=(step_timeout_s or 7 * 24 * 3600) + 600)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    return Ranks(rank, world, tp, timeout, nodes)


# What a collective raises when a peer process went away (gloo and NCCL's words for it)
_PEER_GONE = ("connection closed", "connection reset", "broken pipe", "connection refused")


def gang_broke(exc: BaseException) -> bool:
    """Whether `exc` is a collective or the store failing under this process (another machine
    of the gang lost), not a failure of its own."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(words in text for words in _PEER_GONE)
