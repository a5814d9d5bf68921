"""Publishing a run's weights for serving (DESIGN.md §v2.2): inference workers serve a run's
model (`model: "run_…"`) from the newest weights it published, and reload when it publishes
newer ones.

A run publishes only once its model has been asked for (a request naming `run_…` sets
runs.serving_asked_at): runs nobody serves write nothing beyond their checkpoints, and the API
serves a finished one from its last checkpoint. With serving.sync_every_steps = N > 0 and its
model asked for, the lead publishes the policy at the start of the run (step 0; after a resume
from the checkpoint of step s, at s), after the first step once asked (if it has published
nothing yet), after every step that is a multiple of N, and after its last step: a whole model
folder that transformers and vLLM load
as it is (config, generation config, tokenizer and chat template, model.safetensors), a LoRA
adapter merged into its base weights, in the policy's dtype. It is written to a temporary
sibling and renamed into place, so a reader never sees half of one, then recorded as the run's
weights_step and weights_path. The newest two folders are kept (one being loaded is not pulled
away by the next), and any of a later step, written before a resume went back, is removed.

A run that starts from exactly spec.model.path (no adapter to go on with, no checkpoint, no
resume, the model's own chat template) publishes step 0 as that folder itself, copying nothing,
asked for or not.
Under FSDP every rank takes part in gathering the weights; only the lead writes.
"""

import copy
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from service.config import Settings
from service.contract.spec import RunSpec
from workers.records import RunRecorder
from workers.rollout.vllm import policy_weights

WEIGHTS_FILE = "model.safetensors"
KEEP = 2  # published folders kept


def publishes(spec: RunSpec, step: int) -> bool:
    """Whether `step` is one the run publishes its weights after, when its model has been asked
    for (a step's, not the start's): every sync_every_steps, and its last, so that a finished
    run serves its final weights."""
    every = spec.serving.sync_every_steps
    return every > 0 and (step % every == 0 or step == spec.training.steps)


def starts_as_its_model(spec: RunSpec) -> bool:
    """A fresh run's policy at step 0 is spec.model.path's weights exactly (a fresh LoRA
    adapter adds nothing yet), served with the folder's own chat template."""
    model = spec.model
    return model.adapter is None and model.checkpoint is None and model.chat_template is None


class WeightsPublisher:
    def __init__(self, settings: Settings, recorder: RunRecorder, spec: RunSpec, lead: bool):
        self.recorder, self.spec, self.lead = recorder, spec, lead
        self.folder = settings.runs_dir / recorder.run_id / "weights"

    def publish(self, step: int, model, tokenizer, gather: bool) -> None:
        """Publish `model`'s weights as step `step`'s; `gather`: the weights are sharded, so
        every rank calls this (only the lead writes)."""
        if not self.lead:
            if gather:  # the lead gathers the full weights; each gather is a collective
                for _ in policy_weights(model):
                    pass
            return
        target = self.folder / f"step-{step:06d}"
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write_model(staging, model, tokenizer, self.spec.model.chat_template)
        shutil.rmtree(target, ignore_errors=True)  # a replayed step's
        staging.rename(target)
        self.recorder.record_weights(step, str(target))
        self._prune(step)

    def publish_start(self) -> None:
        """Step 0 as spec.model.path itself (see starts_as_its_model)."""
        if self.lead:
            self.recorder.record_weights(0, self.spec.model.path)
            self._prune(0)

    def _prune(self, step: int) -> None:
        """Keep the newest KEEP folders up to `step`; remove later ones (from before a resume)
        and any staging folder left by a crash."""
        if not self.folder.is_dir():
            return
        folders = sorted(self.folder.iterdir())
        done = [f for f in folders if not f.name.endswith(".tmp") and _step(f) <= step]
        for old in set(folders) - set(done[-KEEP:]):
            shutil.rmtree(old, ignore_errors=True)


def _step(folder: Path) -> int:
    try:
        return int(folder.name.removeprefix("step-"))
    except ValueError:
        return -1  # not ours: removed


def write_model(folder: Path, model, tokenizer, chat_template: str | None) -> None:
    """`model` as a plain model folder in `folder`: its (merged) weights by checkpoint name in
    one safetensors file, its config and generation config, and the tokenizer with the chat
    template the run renders with."""
    write_weights(folder, policy_weights(model), model, tokenizer, chat_template)


def write_weights(
    folder: Path,
    weights: Iterable[tuple[str, torch.Tensor]],
    model,
    tokenizer,
    chat_template: str | None,
) -> None:
    """write_model() with `weights` (policy_weights() of `model`, or a copy of them taken
    earlier) in place of the model's own."""
    from safetensors.torch import save_file

    base = model.get_base_model() if hasattr(model, "peft_config") else model
    tied = _tied_names(base)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        if name not in tied:
            tensors[name] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    config = copy.deepcopy(base.config)
    config.dtype = base.dtype  # what the file holds, whatever the folder it came from said
    config.save_pretrained(folder)
    if base.generation_config is not None:
        base.generation_config.save_pretrained(folder)
    own = tokenizer.chat_template
    if chat_template is not None:  # served as the run renders: with its template
        tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = own


def _tied_names(model) -> set[str]:
    """The checkpoint names of parameters that are another's too (the head of tied embeddings):
    left out of the file, as save_pretrained does; loading ties them again from the config."""
    first: dict[int, str] = {}
    tied = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            tied.add(name.replace(".base_layer.", "."))
        else:
            first[id(parameter)] = name
    return tied
