"""The loss dry-run's numbers (POST /v1/gvpo:dry_run; service/diagnostics says what it is), for
one group under a checkpoint: each completion's log-ratio against the run's starting model,
its GVPO weight, and the group's loss.

Prompt and completions are tokenised by the checkpoint's tokenizer (the prompt as the rollout
engines do, the completions without special tokens), so a completion's tokens are a fresh split
of its text rather than the ids a sampler produced. A group of chat episodes is rendered by the
run's chat template as the run's off-policy episodes are (workers/chat.py Renderer.episode), and
only its assistant tokens carry the log-ratio. The numbers come from the learner's own
code: the same log-prob routine and the GVPO weights and loss of learner/losses.py. The models
are loaded on this worker's CPU for the one request, in float32.
"""

import logging
import tempfile
from pathlib import Path

import torch

from service.config import Settings
from service.contract import storage
from service.contract.storage import CheckpointKind
from service.contract.tasks import (
    DryRunCompletion,
    DryRunOutput,
    DryRunTask,
    TaskAnswer,
    TaskProblem,
)
from workers.chat import ChatTemplateError, Renderer
from workers.errors import RunError
from workers.learner.logprobs import build_batch, sequence_logprobs
from workers.learner.losses import gvpo_loss, gvpo_weights
from workers.model_source import loadable
from workers.rollout.text import eos_token_ids

log = logging.getLogger(__name__)


class _Refused(Exception):
    def __init__(self, problem: TaskProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def answer_dry_run(settings: Settings, task: DryRunTask) -> TaskAnswer:
    """The dry run's output, or the problem (a model that does not load, a group too long)."""
    torch.set_num_threads(settings.torch_threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source = storage.fetch(task.checkpoint_path, Path(tmp) / "checkpoint")
            policy, reference, tokenizer = _load(task, source)
            logps, ref_logps, tokens = _sequence_logps(policy, reference, tokenizer, task)
    except _Refused as refused:
        return TaskAnswer(problem=refused.problem)
    return TaskAnswer(result=_output(task, logps, ref_logps, tokens).model_dump(mode="json"))


def _load(task: DryRunTask, source: Path):
    """(pi_theta, pi_ref or None when it is pi_theta's LoRA adapter switched off, tokenizer)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        base_model = loadable(task.base_model)
        tokenizer = AutoTokenizer.from_pretrained(source)
        if task.checkpoint_kind == CheckpointKind.LORA_ADAPTER:
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
            policy, reference = PeftModel.from_pretrained(base, source), None
        else:
            policy = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            reference = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()
    except (OSError, ValueError, RunError) as exc:
        # What the libraries say names server paths: the worker's log keeps it.
        log.warning("dry run of checkpoint %s: %s", task.checkpoint_id, exc)
        raise _Refused(
            TaskProblem(
                kind="conflict",
                message=f"the worker cannot load checkpoint {task.checkpoint_id} "
                f"or the run's starting model ({type(exc).__name__})",
            )
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return policy.eval(), reference, tokenizer


@torch.no_grad()
def _sequence_logps(policy, reference, tokenizer, task: DryRunTask):
    """Summed completion log-probs under pi_theta and pi_ref, and each completion's tokens
    (an episode's: the ones that carry the loss)."""
    masks = None
    if task.episodes is None:
        prompt = tokenizer(task.prompt)["input_ids"]
        completions = [
            tokenizer(c, add_special_tokens=False)["input_ids"] for c in task.completions or []
        ]
    else:
        prompt, completions, masks = _episodes(policy, tokenizer, task)
    field = "completions" if task.episodes is None else "episodes"
    total = len(completions) * (len(prompt) + max(len(c) for c in completions))
    if total > task.max_tokens:
        raise _Refused(
            TaskProblem(
                kind="invalid",
                message="the group is too long",
                fields=[
                    {
                        "field": field,
                        "message": f"the group is {total} tokens (prompt + longest "
                        f"{field[:-1]}, times k); the dry run takes at most {task.max_tokens}",
                    }
                ],
            )
        )
    batch = build_batch(
        [prompt] * len(completions),
        completions,
        tokenizer.pad_token_id,
        torch.device("cpu"),
        masks,
    )
    logps = sequence_logprobs(policy, batch).summed  # (k,)
    if reference is None:  # LoRA: the base model is the adapter switched off
        with policy.disable_adapter():
            ref_logps = sequence_logprobs(policy, batch).summed
    else:
        ref_logps = sequence_logprobs(reference, batch).summed
    tokens = [len(c) for c in completions] if masks is None else [sum(m) for m in masks]
    return logps, ref_logps, tokens


def _episodes(policy, tokenizer, task: DryRunTask):
    """(prompt ids, each episode's ids after the prompt, their masks) by the run's template."""
    eos = eos_token_ids(policy.generation_config.eos_token_id, tokenizer)
    renderer = Renderer(tokenizer, eos, task.chat_template)
    try:
        split = [renderer.episode(task.messages, e, task.tools) for e in task.episodes]
    except ChatTemplateError as exc:
        raise _Refused(
            TaskProblem(
                kind="invalid",
                message="the run's chat template cannot split the episodes into turns",
                fields=[{"field": "episodes", "message": str(exc)}],
            )
        ) from None
    return split[0].prompt_ids, [s.token_ids for s in split], [s.mask for s in split]


def _output(
    task: DryRunTask, logps: torch.Tensor, ref_logps: torch.Tensor, tokens: list[int]
) -> DryRunOutput:
    rewards = torch.tensor([task.rewards], dtype=torch.float32)  # (1, k): one group
    policy, reference = logps.view(1, -1), ref_logps.view(1, -1)
    weights = gvpo_weights(policy, reference, rewards, task.beta)[0]  # (k,)
    s = (logps - ref_logps).tolist()
    return DryRunOutput(
        log_ratio_mean=sum(s) / len(s),
        loss=gvpo_loss(policy, reference, rewards, task.beta).item(),
        completions=[
            DryRunCompletion(
                completion=c,
                reward=r,
                tokens=n,
                logprob=lp,
                ref_logprob=ref,
                log_ratio=si,
                weight=w,
            )
            for c, r, n, lp, ref, si, w in zip(
                _texts(task),
                task.rewards,
                tokens,
                logps.tolist(),
                ref_logps.tolist(),
                s,
                weights.tolist(),
                strict=True,
            )
        ],
    )


def _texts(task: DryRunTask) -> list[str]:
    """Each completion's text; an episode's, its last assistant message's content."""
    if task.episodes is None:
        return task.completions or []
    return [episode[-1].get("content") or "" for episode in task.episodes]
