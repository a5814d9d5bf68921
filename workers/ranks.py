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

In one process the same calls cost nothing: gather returns [obj] and share returns obj.
"""

import os
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def _part(items: list[T], parts: int, index: int) -> list[T]:
    """The index-th of `parts` equal contiguous parts (len(items) is a multiple of parts)."""
    size = len(items) // parts
    return items[index * size : (index + 1) * size]


class Ranks:
    def __init__(self, rank: int = 0, world: int = 1, tp: int = 1) -> None:
        self.rank, self.world, self.tp = rank, world, tp

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
        dist.gather_object(obj, out, dst=0)
        return out

    def share(self, obj: T) -> T:
        """The lead's `obj` on every rank (what the other ranks pass is ignored)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @torch.no_grad()
    def align(self, model) -> None:
        """Start every rank from the lead's weights (a fresh LoRA adapter is randomly
        initialised in each process)."""
        if self.world == 1:
            return
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def join(step_timeout_s: float | None, tp: int) -> Ranks:
    """Join the process group torchrun set up for this process (gloo on CPU, NCCL on GPUs).

    A collective waits while the lead scores the step's completions, which may take up to the
    step timeout with a slow reward model, so the group's timeout is longer than that.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    timeout = timedelta(seconds=(step_timeout_s or 7 * 24 * 3600) + 600)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    return Ranks(rank, world, tp)
