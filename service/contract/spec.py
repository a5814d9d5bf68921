"""The run spec (POST /v1/runs body, YAML for the CLI): validated models with paper defaults.

Every field has a default except model.path, dataset.train_file and reward. Unknown fields are
rejected, so a typo never silently falls back to a default. Parts of DESIGN.md that this version
does not run yet are refused with a message saying so, never accepted and ignored.
"""

from typing import Annotated, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from service.contract.environments import EnvironmentSpec, WebhookEnvironment
from service.contract.limits import (
    INT32_MAX,
    MAX_BATCH_TOKENS,
    MAX_BETA,
    MAX_EVAL_PROMPTS,
    MAX_GROUP_SIZE,
    MAX_ID,
    MAX_KEPT_CHECKPOINTS,
    MAX_LAG,
    MAX_LORA_RANK,
    MAX_PATH,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS_PER_STEP,
    MAX_STEPS,
    MAX_STOP_STRINGS,
    MAX_TEXT,
    MAX_TOKENS,
)
from service.contract.limits import Strict as _Strict
from service.contract.rewards import CompositeReward, RewardSpec, WebhookReward, finite
from service.contract.tracking import TrackingSpec

Text = Annotated[str, Field(max_length=MAX_TEXT)]


class LoraSpec(_Strict):
    r: int = Field(16, gt=0, le=MAX_LORA_RANK)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Text | Annotated[list[Text], Field(max_length=MAX_TEXT)] = "all-linear"


class ModelSpec(_Strict):
    checkpoint: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_ID,
        description="start from this checkpoint of one of the project's ended runs (ckpt_...): "
        "its weights, or its LoRA adapter over its run's model; the service then "
        "fills in path (and adapter, lora) from that run",
    )
    path: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PATH,
        validate_default=True,
        description="an absolute local directory (the gvpo CLI makes a relative one absolute), "
        "a registered model's name, or a hub id; with checkpoint, set by the service",
    )
    adapter: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PATH,
        description="a PEFT LoRA adapter to go on training instead of a fresh one (set from a "
        "LoRA checkpoint; needs model.lora)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on GPU, float32 on CPU"
    )
    lora: LoraSpec | None = Field(None, description="null = full fine-tune")
    chat_template: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="a Jinja chat template for chat rows, instead of the tokenizer's own",
    )

    @field_validator("path")
    @classmethod
    def _path_or_checkpoint(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("checkpoint") is None:
            raise ValueError(
                "Field required (the model's directory or hub id; or set "
                "model.checkpoint to start from a checkpoint)"
            )
        return v

    @model_validator(mode="after")
    def _adapter_needs_lora(self) -> "ModelSpec":
        if self.adapter is not None and self.lora is None:
            raise ValueError("model.adapter is a LoRA adapter: set model.lora too")
        return self


class DatasetSpec(_Strict):
    train_file: str = Field(min_length=1, max_length=MAX_ID)
    eval_file: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_ID,
        description="JSONL with the same fields: evaluated every eval.every_steps and at the end",
    )
    prompt_field: Text = "prompt"
    answer_field: Text = "answer"
    offpolicy_file: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_ID,
        description="a file of purpose offpolicy: groups of completions made elsewhere, mixed "
        "into training by training.offpolicy_fraction",
    )


def _finite_or_none(v: float | None) -> float | None:
    return v if v is None else finite(v)


class AlgorithmSpec(_Strict):
    """gvpo needs beta > 0 (it divides the reward by it); the GRPO baselines allow beta = 0
    (no KL penalty, TRL's default)."""

    name: Literal["gvpo", "grpo", "dr_grpo"] = "gvpo"
    beta: float = Field(
        0.01,
        ge=0,
        le=MAX_BETA,
        description="KL strength (the paper's runs use 0.1; 0.01 did as well or better in our "
        "study, docs/algorithms.md)",
    )
    group_size: int = Field(8, ge=2, le=MAX_GROUP_SIZE, description="k completions per prompt")
    reference: Literal["sampling", "initial"] = Field(
        "initial",
        description="pi_ref: the starting model (initial; a frozen copy, or the adapter switched "
        "off with LoRA) or the policy that sampled the step (sampling, the authors' code); "
        "default initial, or sampling for a run that goes on training a LoRA adapter",
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="grpo/dr_grpo ratio clip")
    skip_zero_variance: bool = Field(
        False,
        description="leave out groups whose rewards are all equal (false: they train, and for "
        "gvpo their KL term pulls the policy towards pi_ref, as in the authors' code)",
    )

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: float, info: ValidationInfo) -> float:
        finite(v)
        if v == 0 and info.data.get("name", "gvpo") == "gvpo":
            raise ValueError("must be > 0 for gvpo (its optimum is pi_ref * exp(R / beta))")
        return v


class SamplingSpec(_Strict):
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(1024, ge=1, le=MAX_TOKENS)
    stop: list[Text] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)

    _t_finite = field_validator("temperature")(finite)


class RolloutSpec(_Strict):
    """vLLM settings apply when the run rolls out with vLLM; the transformers engine ignores
    them."""

    engine: Literal["auto", "vllm", "hf", "inference"] = Field(
        "auto",
        description="auto = vLLM where installed on the worker, else transformers; inference = "
        "sampled by an inference worker's vLLM server (gvpo serve), which the run's weights "
        "are sent to, so that generation runs on another machine",
    )
    gpu_memory_utilization: float = Field(
        0.5,
        gt=0,
        le=0.95,
        description="vLLM's share of GPU memory (weights + KV cache); the learner gets the rest",
    )
    kv_cache_gib: float | None = Field(
        None, gt=0, description="a fixed KV cache size instead of the share (default 1 on CPU)"
    )
    max_model_len: int | None = Field(
        None, ge=16, le=MAX_TOKENS, description="default: the model's own limit"
    )
    sleep_between_steps: bool = Field(
        True, description="free vLLM's GPU memory while the learner trains (CUDA only)"
    )
    logprob_diff_warn: float | None = Field(
        None,
        gt=0,
        description="warn when rollout/logprob_diff_max exceeds this (default 1e-3 for float32 "
        "models, 1.0 for 16-bit ones)",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        le=8,
        description="vLLM tensor parallel: each group of this many training processes shares "
        "one sharded engine (for models whose inference does not fit one device)",
    )

    _finite_sizes = field_validator("kv_cache_gib", "logprob_diff_warn")(_finite_or_none)


class OptimizerSpec(_Strict):
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)

    _lr_finite = field_validator("lr")(finite)


class TrainingSpec(_Strict):
    steps: int = Field(200, ge=1, le=MAX_STEPS)
    prompts_per_step: int = Field(64, ge=1, le=MAX_PROMPTS_PER_STEP)
    mini_batches: int = Field(
        4,
        ge=1,
        le=MAX_PROMPTS_PER_STEP,
        validate_default=True,
        description="optimizer updates per step, split by group (default 4; 1 when max_lag > 0)",
    )
    micro_batch_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_BATCH_TOKENS,
        description="token budget of one forward/backward pass (whole groups are packed up to "
        "it; a larger group gets a pass of its own); null = the whole mini-batch at once",
    )
    seed: int = Field(0, ge=0, le=INT32_MAX)
    offpolicy_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="share of each step's groups that are off-policy slots: filled by groups "
        "posted to the run (POST /v1/runs/{id}/groups), then dataset.offpolicy_file, "
        "else fresh rollouts (1 with a file: no rollouts at all)",
    )
    wait_for_groups: bool = Field(
        False,
        description="each step waits until groups posted to the run fill its off-policy slots "
        "(an agent training from its own traffic) instead of sampling prompts for the slots "
        "none filled; needs an offpolicy_fraction above 0 (1: the run samples nothing itself)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, more time"
    )
    max_lag: int = Field(
        0,
        ge=0,
        le=MAX_LAG,
        description="async GVPO: the rollout engine samples step t's groups with the weights "
        "of step t-1-max_lag while the learner trains the steps before it (0: each step "
        "samples with the latest weights, one phase after another)",
    )

    @model_validator(mode="after")
    def _one_update_a_step_when_async(self) -> "TrainingSpec":
        """An async step's groups are max_lag steps old when it trains them, and each further
        update of the step trains them staler still: unless set, mini_batches is then 1 (on
        the warm-started task, 4 updates a step learned less with a lag than without, one
        did not: docs/benchmarks.md, "Async GVPO")."""
        if self.max_lag and "mini_batches" not in self.model_fields_set:
            self.mini_batches = 1
        return self

    @field_validator("wait_for_groups")
    @classmethod
    def _waits_for_slots(cls, v: bool, info: ValidationInfo) -> bool:
        if v and not info.data.get("offpolicy_fraction"):
            raise ValueError(
                "wait_for_groups waits for posted groups to fill the off-policy slots, and "
                "offpolicy_fraction is 0 (no slot): set offpolicy_fraction above 0 (1 trains "
                "only on posted groups)"
            )
        return v

    @field_validator("mini_batches")
    @classmethod
    def _enough_prompts(cls, v: int, info: ValidationInfo) -> int:
        prompts = info.data.get("prompts_per_step")
        if prompts is not None and v > prompts:
            raise ValueError(
                f"mini_batches ({v}) cannot exceed prompts_per_step ({prompts}): "
                "every mini-batch needs at least one whole group"
            )
        return v


class EvalSpec(_Strict):
    """Applies when dataset.eval_file is set."""

    every_steps: int = Field(20, ge=1, le=MAX_STEPS)
    samples_per_prompt: int = Field(
        4, ge=1, le=MAX_GROUP_SIZE, description="n: completions sampled per eval prompt"
    )
    k: int | None = Field(
        None,
        ge=1,
        le=MAX_GROUP_SIZE,
        validate_default=True,
        description="the k of eval/pass@k, at most samples_per_prompt (default: equal to it)",
    )
    pass_threshold: float = Field(
        1.0, allow_inf_nan=False, description="a completion passes when its reward is at least this"
    )
    max_prompts: int | None = Field(
        None,
        ge=1,
        le=MAX_EVAL_PROMPTS,
        description="evaluate the first this many rows (default: all)",
    )

    @field_validator("k")
    @classmethod
    def _k_within_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("samples_per_prompt")
        if v is not None and n is not None and v > n:
            raise ValueError(
                f"k ({v}) cannot exceed samples_per_prompt ({n}): pass@k is "
                "estimated from the n completions sampled per prompt"
            )
        return v

    @property
    def pass_k(self) -> int:
        return self.k or self.samples_per_prompt


class CheckpointSpec(_Strict):
    every_steps: int = Field(20, ge=1, le=MAX_STEPS)
    keep_last: int | None = Field(
        3, ge=1, le=MAX_KEPT_CHECKPOINTS, description="null keeps every checkpoint"
    )


class ServingSpec(_Strict):
    """The run's weights as a model to sample: `model: "run_…"` on the OpenAI-compatible
    endpoints serves the newest weights the run has published."""

    sync_every_steps: int = Field(
        10,
        ge=0,
        le=MAX_STEPS,
        description="publish the policy's weights (a LoRA merged) every this many steps, and "
        "at the start, for inference workers serving the run's model to reload; 0 = never (the "
        "run cannot be served)",
    )


class RetentionSpec(_Strict):
    """Which steps' samples stay in the database once the run has moved on (a long run's
    samples outweigh everything else it records: docs/benchmarks.md, "Metrics at scale")."""

    samples_every_steps: int | None = Field(
        1,
        ge=1,
        le=MAX_STEPS,
        description="keep the samples of every step that is a multiple of this for good (1 = "
        "every step); null = none beyond keep_last_steps",
    )
    keep_last_steps: int = Field(
        1,
        ge=1,
        le=MAX_STEPS,
        description="keep the samples of the latest this many steps, whatever their step",
    )

    def drops(self, latest: int) -> int | None:
        """The step whose samples go once step `latest` is recorded (None: none goes)."""
        step = latest - self.keep_last_steps
        every = self.samples_every_steps
        return step if step >= 1 and (every is None or step % every) else None


MAX_RANKS = 8  # training processes on one worker machine
MAX_NODES = 16  # worker machines one run may span
_PROCESSES = "resources.gpus or resources.processes, times resources.nodes"


class ResourcesSpec(_Strict):
    queue: str = Field("default", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")
    gpus: int = Field(
        0,
        ge=0,
        le=MAX_RANKS,
        description="GPUs on one worker; more than 1 trains data-parallel, one process per GPU "
        "(0 = the worker's default device)",
    )
    processes: int | None = Field(
        None,
        ge=1,
        le=MAX_RANKS,
        description="data-parallel training processes on one worker, each with its own rollout "
        "engine; default one per GPU, or 1 without GPUs (more than 1 on CPU uses gloo)",
    )
    nodes: int = Field(
        1,
        ge=1,
        le=MAX_NODES,
        description="worker machines the run spans, each running `gpus` (or `processes`) "
        "training processes: the run waits for that many workers of its queue at once (a "
        "gang), which join one torch.distributed rendezvous and train as one data-parallel "
        "or FSDP job; a lost machine puts the whole run back in the queue to resume from its "
        "latest checkpoint on a fresh gang",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: each process holds the whole model and optimizer state; fsdp: "
        "parameters, gradients and optimizer state are sharded over the processes "
        "(FSDP2), for models whose training state does not fit one device",
    )
    priority: int = Field(
        0,
        ge=-100,
        le=100,
        description="order among this project's runs waiting on the same queue: higher first, "
        "then oldest first (projects share a queue fairly whatever their runs' priorities)",
    )
    step_timeout_s: float | None = Field(
        3600.0,
        gt=0,
        allow_inf_nan=False,
        description="fail the run when one phase of a step (weight sync, rollout, reward, "
        "learn, eval, checkpoint) makes no progress for this long; null = wait "
        "forever",
    )

    @model_validator(mode="after")
    def _one_rank_per_gpu(self) -> "ResourcesSpec":
        if self.gpus and self.processes not in (None, self.gpus):
            raise ValueError(
                f"processes ({self.processes}) must equal gpus ({self.gpus}): each "
                "training process drives one GPU; leave processes out"
            )
        if self.strategy == "fsdp" and self.ranks == 1:
            raise ValueError(
                "strategy 'fsdp' shards the model over several training processes;"
                " ask for more than one (gpus or processes) or use 'ddp'"
            )
        return self

    @property
    def per_node(self) -> int:
        """The training processes on each of the run's workers."""
        return self.processes or max(self.gpus, 1)

    @property
    def ranks(self) -> int:
        """How many training processes the run uses (its data-parallel world size)."""
        return self.per_node * self.nodes


class RunSpec(_Strict):
    name: str | None = Field(None, max_length=200)
    webhook_secret: SecretStr | None = Field(
        None,
        min_length=16,
        max_length=80,
        exclude=True,
        description="bring your own webhook secret (default: one is made); never stored in the "
        "spec or shown again",
    )
    notify_url: str | None = Field(
        None,
        min_length=1,
        max_length=2000,
        description="http(s) URL that receives a signed run.succeeded / run.failed / "
        "run.cancelled event when the run ends",
    )
    model: ModelSpec
    dataset: DatasetSpec
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec, validate_default=True)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    reward: RewardSpec
    environment: EnvironmentSpec | None = Field(
        None, description="multi-turn episodes: a webhook or built-in environment"
    )
    eval: EvalSpec = Field(default_factory=EvalSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    retention: RetentionSpec = Field(default_factory=RetentionSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, validate_default=True)
    tracking: TrackingSpec | None = Field(
        None,
        description="experiment trackers (MLflow, W&B, TensorBoard) that get a copy of the "
        "run's metrics, spec and checkpoints; null = none",
    )

    @field_validator("algorithm")
    @classmethod
    def _reference_with_an_adapter(cls, v: AlgorithmSpec, info: ValidationInfo) -> AlgorithmSpec:
        """With a LoRA adapter to go on training, the default reference is the sampling
        policy; asking for the initial one is an error."""
        model = info.data.get("model")
        if model is not None and model.adapter is not None and v.reference == "initial":
            if "reference" not in v.model_fields_set:
                return v.model_copy(update={"reference": "sampling"})
            raise ValueError(
                "reference 'initial' with a LoRA adapter to go on training "
                "(model.adapter, or a LoRA model.checkpoint) would take the base "
                "model without the adapter as pi_ref, not the model the run starts "
                "from: use reference 'sampling'"
            )
        return v

    @field_validator("resources")
    @classmethod
    def _webhooks_fit_the_step_timeout(
        cls, v: ResourcesSpec, info: ValidationInfo
    ) -> ResourcesSpec:
        reward, limit = info.data.get("reward"), v.step_timeout_s
        parts = reward.components if isinstance(reward, CompositeReward) else [reward]
        hooks = [("reward", p) for p in parts if isinstance(p, WebhookReward)]
        if isinstance(env := info.data.get("environment"), WebhookEnvironment):
            hooks.append(("environment", env))
        for kind, hook in hooks:
            if limit is not None and hook.timeout_s >= limit:
                raise ValueError(
                    f"step_timeout_s ({limit:g} s) must exceed the {kind} webhook's timeout_s "
                    f"({hook.timeout_s:g} s), or one slow answer fails the run"
                )
        return v

    @field_validator("resources")
    @classmethod
    def _fits_the_processes(cls, v: ResourcesSpec, info: ValidationInfo) -> ResourcesSpec:
        """What the rest of the spec must be for the run's training processes."""
        model, rollout, training = (info.data.get(k) for k in ("model", "rollout", "training"))
        if v.strategy == "fsdp" and model is not None and model.lora is not None:
            raise ValueError(
                "strategy 'fsdp' is for full fine-tuning: a LoRA adapter is small, "
                "so train it with 'ddp' (or set model.lora to null)"
            )
        if info.data.get("environment") is not None and v.ranks > 1:
            raise ValueError(
                f"an environment's episodes are played by one training process for now; this "
                f"run has {v.ranks} ({_PROCESSES})"
            )
        tp = rollout.tensor_parallel_size if rollout else 1
        if rollout is not None and rollout.engine == "inference" and v.ranks > 1:
            raise ValueError(
                f"rollout.engine 'inference' samples for one training process for now; this "
                f"run has {v.ranks} ({_PROCESSES})"
            )
        if tp > 1 and rollout.engine == "hf":
            raise ValueError(
                "rollout.tensor_parallel_size needs vLLM: set rollout.engine to 'vllm' or 'auto'"
            )
        if tp > 1 and training is not None and training.max_lag:
            raise ValueError(
                f"training.max_lag samples on a thread of its own, which a tensor-parallel vLLM "
                f"engine (rollout.tensor_parallel_size {tp}) cannot: its shards exchange over "
                "the training processes' own collectives; set max_lag to 0 or "
                "tensor_parallel_size to 1"
            )
        if v.ranks % tp:
            raise ValueError(
                f"rollout.tensor_parallel_size ({tp}) must divide the {v.ranks} "
                f"training processes ({_PROCESSES})"
            )
        if training is not None and training.prompts_per_step % v.ranks:
            raise ValueError(
                f"training.prompts_per_step ({training.prompts_per_step}) must be a multiple of "
                f"the {v.ranks} training processes ({_PROCESSES}): "
                "each process rolls out and trains whole groups of an equal share of the prompts"
            )
        return v

    @field_validator("resources")
    @classmethod
    def _offpolicy_has_groups(cls, v: ResourcesSpec, info: ValidationInfo) -> ResourcesSpec:
        dataset, training = info.data.get("dataset"), info.data.get("training")
        if dataset is None or training is None:
            return v
        fraction, file = training.offpolicy_fraction, dataset.offpolicy_file
        # Without a file, the off-policy slots take groups posted to the run (else rollouts).
        if (file is not None or fraction > 0) and offpolicy_per_engine(training, v.ranks) == 0:
            raise ValueError(
                f"training.offpolicy_fraction ({fraction:g}) makes no off-policy slot in a "
                "step: raise it (each engine's share of "
                f"prompts_per_step, {training.prompts_per_step // v.ranks}, times the "
                "fraction, rounded, must be at least 1)"
            )
        return v


def offpolicy_per_engine(training: TrainingSpec, engines: int) -> int:
    """Off-policy groups in each rollout engine's share of a step (the same for every engine,
    so that all of them generate alike); at submission, checked for the most engines a run can
    have, one per process."""
    return round(training.offpolicy_fraction * (training.prompts_per_step // engines))
