"""Checkpoints: safetensors weights + tokenizer (loadable with from_pretrained), optimizer state,
and trainer_state.json (step, data cursor, RNG state) so a run can continue where it stopped.

A checkpoint is written to a temporary folder and renamed into place, so a crash never leaves
a half-written checkpoint that looks complete.
"""

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))  # JSON turned the tuples into lists
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def load_training_state(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The optimizer state and trainer_state.json (step, data cursor, RNG state), for the
    caller to restore (the RNG once nothing else will draw random numbers)."""
    optimizer = torch.load(directory / OPTIMIZER_FILE, weights_only=True)
    return optimizer, json.loads((directory / STATE_FILE).read_text())


def save_checkpoint(
    directory: Path,
    model,
    tokenizer,
    step: int,
    extra: dict[str, Any],
    optimizer_state: dict[str, Any],
    model_state: dict[str, Any] | None = None,
) -> int:
    """Write the checkpoint for `step` into `directory`; returns its size in bytes.
    `model_state`: the weights to save instead of the model's own (a sharded model's, whole)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    state = {"step": step, "rng": rng_state(), **extra}
    (tmp / STATE_FILE).write_text(json.dumps(state))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
