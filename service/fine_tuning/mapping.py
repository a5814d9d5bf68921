"""A fine-tuning job's body as a GVPO run spec, field by field (docs/fine-tuning.md says the
same for people), and a run spec's field names back in the job's words, for the 422s the run's
checks give.

    method.reinforcement.grader               -> reward
    hyperparameters.batch_size                -> training.prompts_per_step (one update a step)
    hyperparameters.n_epochs                  -> training.steps = ceil(n_epochs * rows / batch)
    hyperparameters.learning_rate_multiplier  -> optimizer.lr = 1e-6 * multiplier
    hyperparameters.compute_multiplier        -> algorithm.group_size = round(8 * multiplier)
    hyperparameters.eval_interval             -> eval.every_steps and checkpoint.every_steps
    hyperparameters.eval_samples              -> eval.samples_per_prompt (pass@k with k = it)
    hyperparameters.reasoning_effort          -> sampling.max_new_tokens (a budget, capped by
                                                 the room the model's context leaves)
    model, training_file, validation_file, seed, suffix -> model, dataset, training.seed, name
"""

import math
from dataclasses import dataclass
from typing import Any

from service.contract.limits import MAX_GROUP_SIZE, MAX_STEPS
from service.contract.spec import AlgorithmSpec, EvalSpec, OptimizerSpec
from service.fine_tuning.schemas import JobCreate, ReinforcementHyperparameters

HYPER = "method.reinforcement.hyperparameters"
BASE_LR = OptimizerSpec.model_fields["lr"].default
BASE_GROUP_SIZE = AlgorithmSpec.model_fields["group_size"].default
# What "auto" (or a hyperparameter left out) resolves to.
AUTO_BATCH_SIZE = 16  # at most: a smaller training file gives its row count
AUTO_N_EPOCHS = 1
AUTO_EVALUATIONS = 10  # eval_interval: about this many evaluations (and checkpoints) a job
AUTO_EVAL_SAMPLES = EvalSpec.model_fields["samples_per_prompt"].default
# reasoning_effort -> the most new tokens a completion may have (before the model's room).
COMPLETION_TOKENS = {"low": 1024, "default": 4096, "medium": 4096, "high": 16384}
KEEP_CHECKPOINTS = 3


@dataclass(frozen=True)
class Plan:
    """The run spec a job is trained by (JSON, before sampling.max_new_tokens is capped by the
    model's room), and its hyperparameters resolved, as the job shows them."""

    spec: dict[str, Any]
    hyperparameters: dict[str, Any]


def _given(value: Any) -> Any:
    return None if value == "auto" else value


def steps(hyperparameters: dict[str, Any], rows: int) -> int:
    """training.steps: n_epochs passes over `rows` rows, batch_size rows a step."""
    return math.ceil(hyperparameters["n_epochs"] * rows / hyperparameters["batch_size"])


def resolve(
    given: ReinforcementHyperparameters | None, rows: int
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """(every hyperparameter with "auto" and the missing ones resolved, problems naming the
    ones this service cannot honour)."""
    hp = given or ReinforcementHyperparameters()
    batch = _given(hp.batch_size) or min(AUTO_BATCH_SIZE, rows)
    epochs = _given(hp.n_epochs) or AUTO_N_EPOCHS
    total = steps({"n_epochs": epochs, "batch_size": batch}, rows)
    compute = _given(hp.compute_multiplier) or 1.0
    resolved = {
        "batch_size": batch,
        "n_epochs": epochs,
        "learning_rate_multiplier": _given(hp.learning_rate_multiplier) or 1.0,
        "compute_multiplier": compute,
        "eval_interval": _given(hp.eval_interval) or max(1, math.ceil(total / AUTO_EVALUATIONS)),
        "eval_samples": _given(hp.eval_samples) or AUTO_EVAL_SAMPLES,
        "reasoning_effort": hp.reasoning_effort or "default",
    }
    problems = []
    if total > MAX_STEPS:
        problems.append(
            {
                "field": f"{HYPER}.n_epochs",
                "message": f"{epochs} epochs of {rows} rows in batches of {batch} is {total} "
                f"steps, more than the {MAX_STEPS} a run may have",
            }
        )
    if not 2 <= group_size(compute) <= MAX_GROUP_SIZE:
        problems.append(
            {
                "field": f"{HYPER}.compute_multiplier",
                "message": f"{compute:g} samples {group_size(compute)} completions per prompt "
                f"({BASE_GROUP_SIZE} times it); GVPO compares at least 2 and at most "
                f"{MAX_GROUP_SIZE}: give a multiplier from {2 / BASE_GROUP_SIZE:g} to "
                f"{MAX_GROUP_SIZE / BASE_GROUP_SIZE:g}",
            }
        )
    return resolved, problems


def group_size(compute_multiplier: float) -> int:
    return round(BASE_GROUP_SIZE * compute_multiplier)


def plan(body: JobCreate, job_id: str, seed: int, rows: int) -> tuple[Plan, list[dict]]:
    """The run spec for a reinforcement job of `rows` training rows (its method checked)."""
    method = body.method.reinforcement
    hp, problems = resolve(method.hyperparameters, rows)
    model = {"checkpoint": body.model} if body.model.startswith("ckpt_") else {"path": body.model}
    spec = {
        "name": body.suffix or job_id,
        "model": model,
        "dataset": {"train_file": body.training_file, "eval_file": body.validation_file},
        "reward": method.grader.model_dump(mode="json", exclude_unset=True),
        "algorithm": {"group_size": group_size(hp["compute_multiplier"])},
        "sampling": {"max_new_tokens": COMPLETION_TOKENS[hp["reasoning_effort"]]},
        "optimizer": {"lr": BASE_LR * hp["learning_rate_multiplier"]},
        "training": {
            "steps": steps(hp, rows),
            "prompts_per_step": hp["batch_size"],
            "mini_batches": 1,
            "seed": seed,
        },
        "eval": {"every_steps": hp["eval_interval"], "samples_per_prompt": hp["eval_samples"]},
        "checkpoint": {"every_steps": hp["eval_interval"], "keep_last": KEEP_CHECKPOINTS},
    }
    return Plan(spec, hp), problems


# A run spec's fields (a prefix of them) -> the job's; the longest prefix wins.
JOB_FIELDS = {
    "model": "model",
    "dataset.train_file": "training_file",
    "dataset.eval_file": "validation_file",
    "dataset": "training_file",
    "reward": "method.reinforcement.grader",
    "training.steps": f"{HYPER}.n_epochs",
    "training.prompts_per_step": f"{HYPER}.batch_size",
    "training.seed": "seed",
    "optimizer.lr": f"{HYPER}.learning_rate_multiplier",
    "algorithm.group_size": f"{HYPER}.compute_multiplier",
    "eval.every_steps": f"{HYPER}.eval_interval",
    "checkpoint.every_steps": f"{HYPER}.eval_interval",
    "eval.samples_per_prompt": f"{HYPER}.eval_samples",
    "sampling.max_new_tokens": f"{HYPER}.reasoning_effort",
    "name": "suffix",
}


def job_field(spec_field: str) -> str:
    """A run spec field as the job's body names it (reward.input ->
    method.reinforcement.grader.input); a field the body has no counterpart of keeps its name."""
    for prefix in sorted(JOB_FIELDS, key=len, reverse=True):
        if spec_field == prefix or spec_field.startswith(prefix + "."):
            rest = spec_field[len(prefix) :]
            target = JOB_FIELDS[prefix]
            return target + rest if prefix == "reward" else target
    return spec_field


def in_job_words(problems: list[dict[str, str]]) -> list[dict[str, str]]:
    """A run's problems named by the job's fields; the run spec's field is said in the message
    where it differs."""
    out = []
    for problem in problems:
        field = job_field(problem["field"])
        message = problem["message"]
        if field != problem["field"]:
            message = f"{message} (the run's {problem['field']})"
        out.append({"field": field, "message": message})
    return out
