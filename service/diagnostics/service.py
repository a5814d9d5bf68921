"""The loss dry-run: what one group of completions would teach a run's policy, before anyone
trains on it.

pi_theta is a checkpoint of the run (its latest by default) and pi_ref the model the run started
from (a LoRA checkpoint's base, with the adapter switched off), as reference="initial" sees
them. Prompt and completions are tokenised by the run's tokenizer (the prompt as the rollout
engines do, the completions without special tokens), so a completion's tokens are a fresh split
of its text rather than the ids a sampler produced. The numbers come from the learner's own
code: the same log-prob routine and the GVPO weights and loss of workers/learner/losses.py.

The models are loaded by the API process on its CPU for each call: it is meant for the small
and medium models one inspects by hand; MAX_TOKENS bounds one call's work.
"""

import tempfile
from pathlib import Path

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.checkpoints import store
from service.checkpoints.service import get_checkpoint
from service.diagnostics.schemas import DryRunCompletion, DryRunRequest, DryRunResult
from service.errors import Conflict, InvalidSpec
from service.models import Checkpoint, Project
from service.runs.service import get_run, run_spec
from service.runs.spec import RunSpec

MAX_TOKENS = 65_536  # padded prompt + completion tokens over the whole group


def dry_run(session: Session, project: Project, req: DryRunRequest) -> DryRunResult:
    run = get_run(session, project, req.model.run_id)
    ckpt_id = req.model.checkpoint_id or session.scalar(
        select(Checkpoint.id).where(Checkpoint.run_id == run.id)
        .order_by(Checkpoint.step.desc()).limit(1))
    if ckpt_id is None:
        raise Conflict(f"run {run.id} has no checkpoint yet; name one of a run that has")
    ckpt = get_checkpoint(session, project, run.id, ckpt_id)
    spec = run_spec(run)
    with tempfile.TemporaryDirectory() as tmp:
        source = store.fetch(ckpt.path, Path(tmp) / "checkpoint")
        policy, reference, tokenizer = _load(spec, ckpt, source)
        logps, ref_logps, tokens = _sequence_logps(policy, reference, tokenizer, req)
    return _result(req, run.id, ckpt, logps, ref_logps, tokens)


def _load(spec: RunSpec, ckpt: Checkpoint, source: Path):
    """(pi_theta, pi_ref or None when it is pi_theta's LoRA adapter switched off, tokenizer)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if ckpt.kind == "lora_adapter":
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(spec.model.path, dtype=torch.float32)
            policy, reference = PeftModel.from_pretrained(base, source), None
        else:
            policy = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            reference = AutoModelForCausalLM.from_pretrained(spec.model.path,
                                                             dtype=torch.float32).eval()
    except OSError as exc:
        raise Conflict(f"the API server cannot load checkpoint {ckpt.id} or the run's starting "
                       f"model {spec.model.path!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return policy.eval(), reference, tokenizer


@torch.no_grad()
def _sequence_logps(policy, reference, tokenizer, req: DryRunRequest):
    """Summed completion log-probs under pi_theta and pi_ref, and each completion's tokens."""
    from workers.learner.logprobs import build_batch, sequence_logprobs

    prompt = tokenizer(req.prompt)["input_ids"]
    completions = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in req.completions]
    total = len(completions) * (len(prompt) + max(len(c) for c in completions))
    if total > MAX_TOKENS:
        raise InvalidSpec([{"field": "completions", "message": f"the group is {total} tokens "
                            f"(prompt + longest completion, times k); the dry run takes at most "
                            f"{MAX_TOKENS}"}])
    batch = build_batch([prompt] * len(completions), completions, tokenizer.pad_token_id,
                        torch.device("cpu"))
    logps = sequence_logprobs(policy, batch).summed  # (k,)
    if reference is None:  # LoRA: the base model is the adapter switched off
        with policy.disable_adapter():
            ref_logps = sequence_logprobs(policy, batch).summed
    else:
        ref_logps = sequence_logprobs(reference, batch).summed
    return logps, ref_logps, [len(c) for c in completions]


def _result(req: DryRunRequest, run_id: str, ckpt: Checkpoint, logps: torch.Tensor,
            ref_logps: torch.Tensor, tokens: list[int]) -> DryRunResult:
    from workers.learner.losses import gvpo_loss, gvpo_weights

    rewards = torch.tensor([req.rewards], dtype=torch.float32)  # (1, k): one group
    policy, reference = logps.view(1, -1), ref_logps.view(1, -1)
    weights = gvpo_weights(policy, reference, rewards, req.beta)[0]  # (k,)
    s = (logps - ref_logps).tolist()
    return DryRunResult(
        run_id=run_id, checkpoint_id=ckpt.id, step=ckpt.step, beta=req.beta,
        reward_mean=sum(req.rewards) / len(req.rewards), log_ratio_mean=sum(s) / len(s),
        loss=gvpo_loss(policy, reference, rewards, req.beta).item(),
        completions=[
            DryRunCompletion(completion=c, reward=r, tokens=n, logprob=lp, ref_logprob=ref,
                             log_ratio=si, weight=w)
            for c, r, n, lp, ref, si, w in zip(req.completions, req.rewards, tokens,
                                                logps.tolist(), ref_logps.tolist(), s,
                                                weights.tolist(), strict=True)
        ],
    )
