"""FSDP (resources.strategy = "fsdp"): the policy's parameters, gradients and optimizer state
sharded over the run's training processes with PyTorch's FSDP2 (`fully_shard`).

Each transformer block is its own FSDP unit (the classes the model names in
`_no_split_modules`), so a forward or backward pass gathers one block's weights at a time; the
root unit holds the rest (embeddings, final norm, head). Every rank must run the same number of
forward and backward passes, since each pass gathers and reduces across all of them: the
learner pads a rank that has fewer micro-batches with filler passes that add nothing.

FSDP averages gradients over the ranks, while the learner's loss is already normalised by the
step's total group count, so the learner scales its loss by the world size to get sums. (A
divide factor of 1 would say this directly, but gloo has no pre-multiplied sum.)

Checkpoints hold full, unsharded tensors, written by rank 0: the same files as a single-process
run, loadable with from_pretrained, and the optimizer state keyed by parameter name.
"""

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model) -> None:
    """Shard `model` in place: one FSDP unit per transformer block, then the root."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)


def reshard(model) -> None:
    """Put every unit's parameters back in their shards: a forward pass without a backward
    (log-probs under no_grad) leaves the root unit's gathered."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank when sharded (a collective), else as is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state(model, optimizer) -> tuple[dict, dict]:
    """The unsharded model and optimizer state dicts on rank 0 (empty elsewhere): a collective,
    so every rank calls it."""
    return (
        get_model_state_dict(model, options=FULL),
        get_optimizer_state_dict(model, optimizer, options=FULL),
    )


def load_optimizer(model, optimizer, state: dict) -> None:
    """Each rank keeps its shard of a full optimizer state dict (as full_state wrote it)."""
    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )
