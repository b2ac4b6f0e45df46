"""The config sections: frozen, keyword-only dataclasses, one per concern; `PPOConfig` holds them all
and its defaults are the built-in demo."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from jaxppo.config.fields import Section, default_of, fields_of, help_of, option, split_optional
from jaxppo.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    _prefix: ClassVar[str] = "model"
    policy: str = option("tiny",
        "policy: HF folder (config.json + safetensors + tokenizer), or 'tiny' to generate a tiny random model")
    tiny_arch: str = option("gpt2",
        "architecture of the generated tiny model when policy is 'tiny'", choices=("gpt2", "llama", "qwen2"))
    reward_model: str | None = option(None,
        "HF folder of a sequence-classification reward model ('tiny' = a random tiny one); null = reward functions/task only")
    critic_init: str = option("policy",
        "where the critic (value model) starts from", choices=("reward_model", "policy"))
    critic: str | None = option(None,
        "HF sequence-classification folder to start the critic from (overrides critic_init), e.g. a separate value model")
    dtype: str = option("float32", "parameter and compute dtype of the trained models", choices=("float32", "bfloat16"))
    ref_dtype: str | None = option(None,
        "dtype of the frozen reference policy; null = same as dtype", choices=("float32", "bfloat16"))
    remat: bool = option(False, "rematerialize (gradient-checkpoint) each transformer block to save memory")
    logits_chunk_mb: int | None = option(None,
        "compute the LM head's float32 logits over response slices of at most this many MB, each "
        "recomputed in the backward (large vocabularies: the [batch, response, vocab] logits never "
        "exist whole); null = all at once, no recompute", ge=1)

    def _validate(self) -> None:
        for name in ("policy", "reward_model"):
            if getattr(self, name) == "":
                raise ConfigError(f"{self._key(name)} is empty: expected a model folder", keys=(self._key(name),))


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    _prefix: ClassVar[str] = "data"
    prompts: str | None = option(None,
        "prompt file: JSONL with a prompt field, or plain text one prompt per line; null = the task's prompts")
    eval_prompts: str | None = option(None, "evaluation prompt file; null = hold out eval_fraction of the prompts")
    eval_fraction: float = option(0.1,
        "fraction of the prompts held out for evaluation when eval_prompts is null", ge=0.0, lt=1.0)
    max_prompt_length: int = option(64, "longest prompt in tokens; longer prompts follow `truncation`", ge=1)
    truncation: str = option("left",
        "prompts longer than max_prompt_length: keep the last tokens (left) or stop (error)", choices=("left", "error"))
    prompt_field: str = option("prompt", "JSON field that holds the prompt in JSONL files")
    use_chat_template: bool = option(False, "wrap each prompt as a user turn with the tokenizer's chat template")
    shuffle: bool = option(True, "reshuffle the training prompts every epoch")

    def _validate(self) -> None:
        if not self.prompt_field:
            raise ConfigError("data.prompt_field is empty: expected a JSON field name", keys=("data.prompt_field",))


@dataclass(frozen=True, kw_only=True)
class RewardConfig(Section):
    _prefix: ClassVar[str] = "reward"
    task: str | None = option("vowels", "built-in task (prompts + reward function); null = none")
    functions: list[str] = option([], "reward functions 'module:function' called as f(prompts, responses) -> scores")
    weights: list[float] = option([], "weight of each reward function; empty = all 1.0")
    clip: float | None = option(None, "clip scores to [-clip, clip]; null = no clipping", gt=0.0)
    normalize: bool = option(True, "normalize scores with a running mean and std over all batches so far (kl_coef then works in reward std units)")
    on_error: str = option("raise",
        "a reward function that raises: stop the run, or give error_penalty", choices=("raise", "penalty"))
    error_penalty: float = option(-1.0, "score given to a sample whose reward function raised (on_error=penalty)")

    __hash__ = Section.field_hash  # the only section with list fields

    def _validate(self) -> None:
        for i, spec in enumerate(self.functions):
            module, _, func = spec.partition(":")
            if not module or not func:
                raise ConfigError(f"reward.functions[{i}]={spec!r}: expected 'module:function'",
                                  keys=("reward.functions",))
        if self.weights and len(self.weights) != len(self.functions):
            raise ConfigError(f"reward.weights has {len(self.weights)} entries but reward.functions has "
                              f"{len(self.functions)}: expected the same length (or empty weights)",
                              keys=("reward.weights",))


@dataclass(frozen=True, kw_only=True)
class RolloutConfig(Section):
    _prefix: ClassVar[str] = "rollout"
    max_new_tokens: int = option(32, "response length in tokens", ge=1)
    temperature: float = option(0.7, "sampling temperature", gt=0.0)
    top_k: int = option(0, "sample from the k most likely tokens; 0 = off", ge=0)
    top_p: float = option(1.0, "nucleus sampling mass; 1.0 = off", gt=0.0, le=1.0)
    stop_at_eos: bool = option(True, "end a response at its first EOS token (later tokens are masked)")
    missing_eos_penalty: float | None = option(None,
        "subtracted from the score of responses without EOS; null = off", ge=0.0)
    forward_batch_size: int | None = option(None,
        "micro-batch of the no-grad scoring forwards; null = whole batch", ge=1)


@dataclass(frozen=True, kw_only=True)
class AdaptiveKLConfig(Section):
    _prefix: ClassVar[str] = "ppo.adaptive_kl"
    target: float = option(6.0, "KL (summed over the response) the adaptive controller steers towards", gt=0.0)
    horizon: int = option(10000, "controller horizon in samples (Ziegler et al. 2019)", ge=1)


@dataclass(frozen=True, kw_only=True)
class PPOSectionConfig(Section):
    _prefix: ClassVar[str] = "ppo"
    epochs: int = option(4, "optimization epochs over each rollout batch", ge=1)
    num_minibatches: int = option(2, "minibatches per epoch (train.batch_size must divide evenly)", ge=1)
    clip_eps: float = option(0.2, "policy ratio clip range", gt=0.0)
    clip_value: float = option(0.2, "value prediction clip range around the old values", gt=0.0)
    vf_coef: float = option(0.1, "value loss coefficient", ge=0.0)
    ent_coef: float = option(0.0, "entropy bonus coefficient")
    gamma: float = option(1.0, "discount factor", ge=0.0, le=1.0)
    lam: float = option(0.95, "GAE lambda", ge=0.0, le=1.0)
    kl_coef: float = option(0.05, "KL penalty coefficient (initial value when adaptive_kl is on)", ge=0.0)
    kl_estimator: str = option("k1", "per-token KL estimator", choices=("k1", "k2", "k3", "abs"))
    adaptive_kl: AdaptiveKLConfig | None = option(None,
        "adaptive KL controller {target, horizon}; null = fixed kl_coef")
    whiten_advantages: bool = option(True, "whiten advantages over the batch's valid tokens")


@dataclass(frozen=True, kw_only=True)
class PlateauConfig(Section):
    _prefix: ClassVar[str] = "optim.plateau"
    metric: str = option("objective/scores", "metric watched by the plateau schedule")
    mode: str = option("max", "whether the metric should go up (max) or down (min)", choices=("max", "min"))
    factor: float = option(0.5, "multiply the learning rate by this on a plateau", gt=0.0, lt=1.0)
    patience: int = option(5, "steps without improvement before reducing", ge=0)
    cooldown: int = option(0, "steps to wait after a reduction before watching again", ge=0)
    min_scale: float = option(0.01, "lower bound of the learning-rate scale", gt=0.0, le=1.0)
    rtol: float = option(1e-4, "relative improvement that counts", ge=0.0)
    atol: float = option(0.0, "absolute improvement that counts", ge=0.0)

    def _validate(self) -> None:
        if self.rtol == 0 and self.atol == 0:
            raise ConfigError("optim.plateau.rtol and optim.plateau.atol are both 0: one must be positive",
                              keys=("optim.plateau.rtol", "optim.plateau.atol"))
        if self.metric not in ("objective/scores", "objective/rlhf_reward", "objective/kl",
                               "objective/non_score_reward", "objective/entropy"):
            raise ConfigError(f"optim.plateau.metric={self.metric!r}: the plateau schedule is driven inside the update "
                              f"by a metric known before it: objective/scores, objective/rlhf_reward, objective/kl, "
                              f"objective/non_score_reward or objective/entropy", keys=("optim.plateau.metric",))


@dataclass(frozen=True, kw_only=True)
class OptimConfig(Section):
    _prefix: ClassVar[str] = "optim"
    lr: float = option(3.0e-3, "policy learning rate (peak, after warmup); the default suits the tiny demo model, real LMs want ~1e-6 to 1e-5", gt=0.0)
    critic_lr: float | None = option(None, "critic learning rate; null = lr", gt=0.0)
    schedule: str = option("constant",
        "learning-rate schedule after warmup", choices=("constant", "linear", "cosine", "plateau"))
    warmup_steps: int = option(0, "linear warmup from 0, in optimizer updates", ge=0)
    min_lr_ratio: float = option(0.0, "final lr / peak lr for the linear and cosine schedules", ge=0.0, le=1.0)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay", ge=0.0)
    max_grad_norm: float | None = option(1.0, "clip the global gradient norm; null = no clipping", gt=0.0)
    grad_accum_steps: int = option(1, "micro-batches accumulated per optimizer update", ge=1)
    adam_b1: float = option(0.9, "Adam beta1", ge=0.0, lt=1.0)
    adam_b2: float = option(0.999, "Adam beta2", ge=0.0, lt=1.0)
    adam_eps: float = option(1e-8, "Adam epsilon", gt=0.0)
    plateau: PlateauConfig = option(PlateauConfig(), "reduce-on-plateau settings (schedule=plateau)")

    def _validate(self) -> None:
        if self.schedule == "plateau" and not self.plateau.metric:
            raise ConfigError("optim.schedule=plateau needs optim.plateau.metric (got an empty name)",
                              keys=("optim.plateau.metric",))


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Section):
    _prefix: ClassVar[str] = "train"
    total_steps: int = option(120, "PPO iterations (rollout + update) to run", ge=1)
    batch_size: int = option(16, "prompts per iteration", ge=1)
    seed: int = option(0, "seed of all randomness (sampling, shuffling, initialization)", ge=0)
    deterministic: bool = option(False,
        "GPU: deterministic XLA kernels, so that a rerun or a resume gives the same bits (~12% slower "
        "on an H200; sets XLA_FLAGS=--xla_gpu_deterministic_ops=true before JAX starts); the CPU is deterministic without it")
    output_dir: str = option("runs/demo", "run directory: config, logs, metrics, checkpoints, plots, final model")
    eval_every: int = option(0, "evaluate every N iterations; 0 = only at the end", ge=0)
    save_every: int = option(0, "checkpoint every N iterations; 0 = only at the end", ge=0)
    keep_checkpoints: int = option(3, "most recent checkpoints kept", ge=1)
    async_eval: bool = option(True,
        "evaluate in the background while the next step trains (holds a copy of the policy weights "
        "meanwhile); early stopping on an eval/ metric always waits for it")
    eval_batch_size: int | None = option(None,
        "prompts per evaluation batch; null = all eval prompts at once, up to 4 x batch_size", ge=1)
    max_nonfinite_steps: int = option(3, "stop after this many consecutive steps that skipped an optimizer step (non-finite loss or gradients)", ge=1)
    log_every: int = option(1, "write metrics every N iterations", ge=1)
    num_samples_logged: int = option(4, "generations written to samples.jsonl at each evaluation", ge=0)
    mesh_data: int = option(1, "devices on the data-parallel mesh axis (-1 = all left over)", ge=-1)
    mesh_fsdp: int = option(-1, "devices on the FSDP axis that shards params and optimizer state (-1 = all left over)", ge=-1)
    placement: str = option("auto",
        "where the critic trains: colocated (on the policy's devices, after it), separate (the devices "
        "split in two halves, policy and critic programs side by side; each half gets the mesh), auto "
        "(separate in one CPU process with an even number >= 2 of devices, else colocated)",
        choices=("auto", "colocated", "separate"))

    def _validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("train.output_dir is empty: expected a directory", keys=("train.output_dir",))


@dataclass(frozen=True, kw_only=True)
class EarlyStoppingConfig(Section):
    _prefix: ClassVar[str] = "early_stopping"
    metric: str | None = option(None, "eval metric watched for early stopping; null = off")
    mode: str = option("max", "whether the metric should go up (max) or down (min)", choices=("max", "min"))
    patience: int = option(5, "evaluations without improvement before stopping", ge=1)
    min_delta: float = option(0.0, "smallest change that counts as an improvement", ge=0.0)


@dataclass(frozen=True, kw_only=True)
class LoggingConfig(Section):
    _prefix: ClassVar[str] = "logging"
    tensorboard: bool = option(True, "write TensorBoard event files to <output_dir>/tensorboard")
    wandb: bool = option(False, "log to Weights & Biases (pip install 'jaxppo[wandb]')")
    wandb_project: str = option("jaxppo", "wandb project name")
    wandb_mode: str = option("offline", "wandb mode", choices=("online", "offline"))
    progress_bar: bool = option(True, "show a progress bar on the console")


@dataclass(frozen=True, kw_only=True)
class PPOConfig(Section):
    """The whole configuration; `PPOConfig()` is the built-in demo."""

    model: ModelConfig = option(ModelConfig(), "models")
    data: DataConfig = option(DataConfig(), "prompts")
    reward: RewardConfig = option(RewardConfig(), "reward sources")
    rollout: RolloutConfig = option(RolloutConfig(), "sampling")
    ppo: PPOSectionConfig = option(PPOSectionConfig(), "PPO algorithm")
    optim: OptimConfig = option(OptimConfig(), "optimizer")
    train: TrainConfig = option(TrainConfig(), "training loop")
    early_stopping: EarlyStoppingConfig = option(EarlyStoppingConfig(), "early stopping")
    logging: LoggingConfig = option(LoggingConfig(), "logging")

    @property
    def minibatch_size(self) -> int:
        """Sequences per optimizer update: batch_size / num_minibatches."""
        return self.train.batch_size // self.ppo.num_minibatches

    @property
    def microbatch_size(self) -> int:
        """Sequences per gradient computation: minibatch_size / grad_accum_steps."""
        return self.minibatch_size // self.optim.grad_accum_steps

    def replace(self, **changes: Any) -> PPOConfig:
        """`dataclasses.replace` (sections are replaced whole: `c.replace(ppo=replace(c.ppo, kl_coef=0.1))`)."""
        return dataclasses.replace(self, **changes)

    def _validate(self) -> None:
        b, m, a = self.train.batch_size, self.ppo.num_minibatches, self.optim.grad_accum_steps
        if b % m:
            raise ConfigError(f"train.batch_size={b} is not divisible by ppo.num_minibatches={m}",
                              keys=("train.batch_size", "ppo.num_minibatches"))
        if (b // m) % a:
            raise ConfigError(f"minibatch size train.batch_size/ppo.num_minibatches={b // m} is not divisible by "
                              f"optim.grad_accum_steps={a}", keys=("optim.grad_accum_steps", "train.batch_size"))
        fb = self.rollout.forward_batch_size
        if fb is not None and b % fb:
            raise ConfigError(f"train.batch_size={b} is not divisible by rollout.forward_batch_size={fb}",
                              keys=("rollout.forward_batch_size", "train.batch_size"))
        eb = self.train.eval_batch_size
        if fb is not None and eb is not None and eb % fb:
            raise ConfigError(f"train.eval_batch_size={eb} is not divisible by rollout.forward_batch_size={fb}",
                              keys=("rollout.forward_batch_size", "train.eval_batch_size"))
        if self.model.critic_init == "reward_model" and self.model.reward_model is None:
            raise ConfigError("model.critic_init=reward_model needs model.reward_model (got null)",
                              keys=("model.critic_init", "model.reward_model"))
        # "no reward source" is checked by PPOTrainer: Python callers may pass reward functions directly


def describe_fields(cls: type = PPOConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every leaf field as (dotted_key, default, help), in declaration order (for `--help`).

    An optional sub-section (`ppo.adaptive_kl`, default null) is listed itself and then its fields.
    """
    rows: list[tuple[str, Any, str]] = []
    for name, (tp, f) in fields_of(cls).items():
        key = prefix + name
        optional, inner = split_optional(tp)
        if dataclasses.is_dataclass(inner):
            if optional:
                rows.append((key, default_of(f), help_of(f)))
            rows.extend(describe_fields(inner, key + "."))
        else:
            rows.append((key, default_of(f), help_of(f)))
    return rows
