"""Loading the policy model and tokenizer for a run, with errors a user can act on."""

from pathlib import Path

import torch

from service.contract.spec import RunSpec
from workers.errors import RunError


def pick_device(spec: RunSpec) -> torch.device:
    """CUDA where the worker has it (under data parallelism, the rank's own GPU: the current
    device), else CPU; a run that asked for more GPUs than the worker has fails here."""
    gpus, found = spec.resources.gpus, torch.cuda.device_count()
    if gpus > found:
        where = f"only {found} CUDA device{'s' * (found > 1)}" if found else "no CUDA device"
        raise RunError(
            f"resources.gpus is {gpus} but this worker has {where}; submit to a "
            "queue whose workers have that many GPUs, or ask for fewer"
        )
    return torch.device("cuda") if found else torch.device("cpu")


def pick_dtype(spec: RunSpec, device: torch.device) -> torch.dtype:
    if spec.model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec.model.dtype)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists()


def load_policy(spec: RunSpec, device: torch.device, checkpoint: Path | None = None):
    """The policy from spec.model.path (with LoRA, a fresh adapter or spec.model.adapter on
    top), or its trained weights from a checkpoint of this run (a whole model, or with LoRA the
    adapter on top of spec.model.path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = spec.model.path
    if _looks_local(path) and not Path(path).expanduser().is_dir():
        raise RunError(f"model.path {path!r} does not exist on the worker (expected a directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        full = checkpoint if checkpoint is not None and spec.model.lora is None else path
        model = AutoModelForCausalLM.from_pretrained(full, dtype=pick_dtype(spec, device))
    except (OSError, ValueError, KeyError) as exc:  # missing files; a config it cannot read
        raise RunError(f"could not load model {path!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.model.lora is not None and (adapter := checkpoint or spec.model.adapter):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    elif spec.model.lora is not None:
        model = _with_lora(model, spec)
    model.to(device).train()
    return model, tokenizer


def _with_lora(model, spec: RunSpec):
    """Wrap the model in a PEFT LoRA adapter; only the adapter's weights train."""
    from peft import LoraConfig, get_peft_model

    lora = spec.model.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. target_modules that match no layer
        raise RunError(f"model.lora: {exc}") from exc
