"""The config sections: frozen, keyword-only dataclasses, one per concern; `PPOConfig` holds them all
and its defaults are the built-in demo."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from jaxppo.config.fields import (
    _SECTION,
    _default,
    _field,
    _fields_of,
    _help,
    _Section,
    _split_optional,
)
from jaxppo.errors import ConfigError


@dataclass(**_SECTION)
class ModelConfig(_Section):
    _prefix: ClassVar[str] = "model"
    policy: str = _field("tiny",
        "policy: HF folder (config.json + safetensors + tokenizer), or 'tiny' to generate a tiny random model")
    tiny_arch: str = _field("gpt2",
        "architecture of the generated tiny model when policy is 'tiny'", choices=("gpt2", "llama", "qwen2"))
    reward_model: str | None = _field(None,
        "HF folder of a sequence-classification reward model ('tiny' = a random tiny one); null = reward functions/task only")
    critic_init: str = _field("policy",
        "where the critic (value model) starts from", choices=("reward_model", "policy"))
    critic: str | None = _field(None,
        "HF sequence-classification folder to start the critic from (overrides critic_init), e.g. a separate value model")
    dtype: str = _field("float32", "parameter and compute dtype of the trained models", choices=("float32", "bfloat16"))
    ref_dtype: str | None = _field(None,
        "dtype of the frozen reference policy; null = same as dtype", choices=("float32", "bfloat16"))
    remat: bool = _field(False, "rematerialize (gradient-checkpoint) each transformer block to save memory")
    logits_chunk_mb: int | None = _field(None,
        "compute the LM head's float32 logits over response slices of at most this many MB, each "
        "recomputed in the backward (large vocabularies: the [batch, response, vocab] logits never "
        "exist whole); null = all at once, no recompute", ge=1)

    def _validate(self) -> None:
        for name in ("policy", "reward_model"):
            if getattr(self, name) == "":
                raise ConfigError(f"{self._key(name)} is empty: expected a model folder", keys=(self._key(name),))


@dataclass(**_SECTION)
class DataConfig(_Section):
    _prefix: ClassVar[str] = "data"
    prompts: str | None = _field(None,
        "prompt file: JSONL with a prompt field, or plain text one prompt per line; null = the task's prompts")
    eval_prompts: str | None = _field(None, "evaluation prompt file; null = hold out eval_fraction of the prompts")
    eval_fraction: float = _field(0.1,
        "fraction of the prompts held out for evaluation when eval_prompts is null", ge=0.0, lt=1.0)
    max_prompt_length: int = _field(64, "longest prompt in tokens; longer prompts follow `truncation`", ge=1)
    truncation: str = _field("left",
        "prompts longer than max_prompt_length: keep the last tokens (left) or stop (error)", choices=("left", "error"))
    prompt_field: str = _field("prompt", "JSON field that holds the prompt in JSONL files")
    use_chat_template: bool = _field(False, "wrap each prompt as a user turn with the tokenizer's chat template")
    shuffle: bool = _field(True, "reshuffle the training prompts every epoch")

    def _validate(self) -> None:
        if not self.prompt_field:
            raise ConfigError("data.prompt_field is empty: expected a JSON field name", keys=("data.prompt_field",))


@dataclass(**_SECTION)
class RewardConfig(_Section):
    _prefix: ClassVar[str] = "reward"
    task: str | None = _field("vowels", "built-in task (prompts + reward function); null = none")
    functions: list[str] = _field([], "reward functions 'module:function' called as f(prompts, responses) -> scores")
    weights: list[float] = _field([], "weight of each reward function; empty = all 1.0")
    clip: float | None = _field(None, "clip scores to [-clip, clip]; null = no clipping", gt=0.0)
    normalize: bool = _field(True, "normalize scores with a running mean and std over all batches so far (kl_coef then works in reward std units)")
    on_error: str = _field("raise",
        "a reward function that raises: stop the run, or give error_penalty", choices=("raise", "penalty"))
    error_penalty: float = _field(-1.0, "score given to a sample whose reward function raised (on_error=penalty)")

    __hash__ = _Section._hash  # the only section with list fields

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


@dataclass(**_SECTION)
class RolloutConfig(_Section):
    _prefix: ClassVar[str] = "rollout"
    max_new_tokens: int = _field(32, "response length in tokens", ge=1)
    temperature: float = _field(0.7, "sampling temperature", gt=0.0)
    top_k: int = _field(0, "sample from the k most likely tokens; 0 = off", ge=0)
    top_p: float = _field(1.0, "nucleus sampling mass; 1.0 = off", gt=0.0, le=1.0)
    stop_at_eos: bool = _field(True, "end a response at its first EOS token (later tokens are masked)")
    missing_eos_penalty: float | None = _field(None,
        "subtracted from the score of responses without EOS; null = off", ge=0.0)
    forward_batch_size: int | None = _field(None,
        "micro-batch of the no-grad scoring forwards; null = whole batch", ge=1)


@dataclass(**_SECTION)
class AdaptiveKLConfig(_Section):
    _prefix: ClassVar[str] = "ppo.adaptive_kl"
    target: float = _field(6.0, "KL (summed over the response) the adaptive controller steers towards", gt=0.0)
    horizon: int = _field(10000, "controller horizon in samples (Ziegler et al. 2019)", ge=1)


@dataclass(**_SECTION)
class PPOSectionConfig(_Section):
    _prefix: ClassVar[str] = "ppo"
    epochs: int = _field(4, "optimization epochs over each rollout batch", ge=1)
    num_minibatches: int = _field(2, "minibatches per epoch (train.batch_size must divide evenly)", ge=1)
    clip_eps: float = _field(0.2, "policy ratio clip range", gt=0.0)
    clip_value: float = _field(0.2, "value prediction clip range around the old values", gt=0.0)
    vf_coef: float = _field(0.1, "value loss coefficient", ge=0.0)
    ent_coef: float = _field(0.0, "entropy bonus coefficient")
    gamma: float = _field(1.0, "discount factor", ge=0.0, le=1.0)
    lam: float = _field(0.95, "GAE lambda", ge=0.0, le=1.0)
    kl_coef: float = _field(0.05, "KL penalty coefficient (initial value when adaptive_kl is on)", ge=0.0)
    kl_estimator: str = _field("k1", "per-token KL estimator", choices=("k1", "k2", "k3", "abs"))
    adaptive_kl: AdaptiveKLConfig | None = _field(None,
        "adaptive KL controller {target, horizon}; null = fixed kl_coef")
    whiten_advantages: bool = _field(True, "whiten advantages over the batch's valid tokens")


@dataclass(**_SECTION)
class PlateauConfig(_Section):
    _prefix: ClassVar[str] = "optim.plateau"
    metric: str = _field("objective/scores", "metric watched by the plateau schedule")
    mode: str = _field("max", "whether the metric should go up (max) or down (min)", choices=("max", "min"))
    factor: float = _field(0.5, "multiply the learning rate by this on a plateau", gt=0.0, lt=1.0)
    patience: int = _field(5, "steps without improvement before reducing", ge=0)
    cooldown: int = _field(0, "steps to wait after a reduction before watching again", ge=0)
    min_scale: float = _field(0.01, "lower bound of the learning-rate scale", gt=0.0, le=1.0)
    rtol: float = _field(1e-4, "relative improvement that counts", ge=0.0)
    atol: float = _field(0.0, "absolute improvement that counts", ge=0.0)

    def _validate(self) -> None:
        if self.rtol == 0 and self.atol == 0:
            raise ConfigError("optim.plateau.rtol and optim.plateau.atol are both 0: one must be positive",
                              keys=("optim.plateau.rtol", "optim.plateau.atol"))
        if self.metric not in ("objective/scores", "objective/rlhf_reward", "objective/kl",
                               "objective/non_score_reward", "objective/entropy"):
            raise ConfigError(f"optim.plateau.metric={self.metric!r}: the plateau schedule is driven inside the update "
                              f"by a metric known before it: objective/scores, objective/rlhf_reward, objective/kl, "
                              f"objective/non_score_reward or objective/entropy", keys=("optim.plateau.metric",))


@dataclass(**_SECTION)
class OptimConfig(_Section):
    _prefix: ClassVar[str] = "optim"
    lr: float = _field(3.0e-3, "policy learning rate (peak, after warmup); the default suits the tiny demo model, real LMs want ~1e-6 to 1e-5", gt=0.0)
    critic_lr: float | None = _field(None, "critic learning rate; null = lr", gt=0.0)
    schedule: str = _field("constant",
        "learning-rate schedule after warmup", choices=("constant", "linear", "cosine", "plateau"))
    warmup_steps: int = _field(0, "linear warmup from 0, in optimizer updates", ge=0)
    min_lr_ratio: float = _field(0.0, "final lr / peak lr for the linear and cosine schedules", ge=0.0, le=1.0)
    weight_decay: float = _field(0.0, "AdamW decoupled weight decay", ge=0.0)
    max_grad_norm: float | None = _field(1.0, "clip the global gradient norm; null = no clipping", gt=0.0)
    grad_accum_steps: int = _field(1, "micro-batches accumulated per optimizer update", ge=1)
    adam_b1: float = _field(0.9, "Adam beta1", ge=0.0, lt=1.0)
    adam_b2: float = _field(0.999, "Adam beta2", ge=0.0, lt=1.0)
    adam_eps: float = _field(1e-8, "Adam epsilon", gt=0.0)
    plateau: PlateauConfig = _field(PlateauConfig(), "reduce-on-plateau settings (schedule=plateau)")

    def _validate(self) -> None:
        if self.schedule == "plateau" and not self.plateau.metric:
            raise ConfigError("optim.schedule=plateau needs optim.plateau.metric (got an empty name)",
                              keys=("optim.plateau.metric",))


@dataclass(**_SECTION)
class TrainConfig(_Section):
    _prefix: ClassVar[str] = "train"
    total_steps: int = _field(120, "PPO iterations (rollout + update) to run", ge=1)
    batch_size: int = _field(16, "prompts per iteration", ge=1)
    seed: int = _field(0, "seed of all randomness (sampling, shuffling, initialization)", ge=0)
    deterministic: bool = _field(False,
        "GPU: deterministic XLA kernels, so that a rerun or a resume gives the same bits (~12% slower "
        "on an H200; sets XLA_FLAGS=--xla_gpu_deterministic_ops=true before JAX starts); the CPU is deterministic without it")
    output_dir: str = _field("runs/demo", "run directory: config, logs, metrics, checkpoints, plots, final model")
    eval_every: int = _field(0, "evaluate every N iterations; 0 = only at the end", ge=0)
    save_every: int = _field(0, "checkpoint every N iterations; 0 = only at the end", ge=0)
    keep_checkpoints: int = _field(3, "most recent checkpoints kept", ge=1)
    async_eval: bool = _field(True,
        "evaluate in the background while the next step trains (holds a copy of the policy weights "
        "meanwhile); early stopping on an eval/ metric always waits for it")
    eval_batch_size: int | None = _field(None,
        "prompts per evaluation batch; null = all eval prompts at once, up to 4 x batch_size", ge=1)
    max_nonfinite_steps: int = _field(3, "stop after this many consecutive steps that skipped an optimizer step (non-finite loss or gradients)", ge=1)
    log_every: int = _field(1, "write metrics every N iterations", ge=1)
    num_samples_logged: int = _field(4, "generations written to samples.jsonl at each evaluation", ge=0)
    mesh_data: int = _field(1, "devices on the data-parallel mesh axis (-1 = all left over)", ge=-1)
    mesh_fsdp: int = _field(-1, "devices on the FSDP axis that shards params and optimizer state (-1 = all left over)", ge=-1)
    placement: str = _field("auto",
        "where the critic trains: colocated (on the policy's devices, after it), separate (the devices "
        "split in two halves, policy and critic programs side by side; each half gets the mesh), auto "
        "(separate in one CPU process with an even number >= 2 of devices, else colocated)",
        choices=("auto", "colocated", "separate"))

    def _validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("train.output_dir is empty: expected a directory", keys=("train.output_dir",))


@dataclass(**_SECTION)
class EarlyStoppingConfig(_Section):
    _prefix: ClassVar[str] = "early_stopping"
    metric: str | None = _field(None, "eval metric watched for early stopping; null = off")
    mode: str = _field("max", "whether the metric should go up (max) or down (min)", choices=("max", "min"))
    patience: int = _field(5, "evaluations without improvement before stopping", ge=1)
    min_delta: float = _field(0.0, "smallest change that counts as an improvement", ge=0.0)


@dataclass(**_SECTION)
class LoggingConfig(_Section):
    _prefix: ClassVar[str] = "logging"
    tensorboard: bool = _field(True, "write TensorBoard event files to <output_dir>/tensorboard")
    wandb: bool = _field(False, "log to Weights & Biases (pip install 'jaxppo[wandb]')")
    wandb_project: str = _field("jaxppo", "wandb project name")
    wandb_mode: str = _field("offline", "wandb mode", choices=("online", "offline"))
    progress_bar: bool = _field(True, "show a progress bar on the console")


@dataclass(**_SECTION)
class PPOConfig(_Section):
    """The whole configuration; `PPOConfig()` is the built-in demo."""

    model: ModelConfig = _field(ModelConfig(), "models")
    data: DataConfig = _field(DataConfig(), "prompts")
    reward: RewardConfig = _field(RewardConfig(), "reward sources")
    rollout: RolloutConfig = _field(RolloutConfig(), "sampling")
    ppo: PPOSectionConfig = _field(PPOSectionConfig(), "PPO algorithm")
    optim: OptimConfig = _field(OptimConfig(), "optimizer")
    train: TrainConfig = _field(TrainConfig(), "training loop")
    early_stopping: EarlyStoppingConfig = _field(EarlyStoppingConfig(), "early stopping")
    logging: LoggingConfig = _field(LoggingConfig(), "logging")

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
    for name, (tp, f) in _fields_of(cls).items():
        key = prefix + name
        optional, inner = _split_optional(tp)
        if dataclasses.is_dataclass(inner):
            if optional:
                rows.append((key, _default(f), _help(f)))
            rows.extend(describe_fields(inner, key + "."))
        else:
            rows.append((key, _default(f), _help(f)))
    return rows


def check_devices(config: PPOConfig, num_devices: int, platform: str = "cpu", num_processes: int = 1) -> None:
    """Raises ConfigError unless the device mesh and the batch sizes fit `num_devices` devices.

    With `train.placement` separate the devices split into two halves (policy, critic), and each
    half gets the mesh. The mesh (train.mesh_data x train.mesh_fsdp, -1 = the devices left over)
    must use every device of its half, and each batch is split evenly over them: train.batch_size
    and train.eval_batch_size must be multiples of that count. Called by `PPOTrainer` before it
    loads any model.
    """
    from jaxppo.engine.mesh import resolve_placement

    t = config.train
    if t.placement == "separate" and (num_devices < 2 or num_devices % 2):
        raise ConfigError(f"train.placement=separate needs an even number of devices >= 2, found {num_devices} "
                          "(on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2)", keys=("train.placement",))
    separate = resolve_placement(t.placement, num_devices, platform, num_processes) == "separate"
    if separate and num_processes > 1:
        raise ConfigError(f"train.placement={t.placement} puts the critic on devices of its own, which is not "
                          f"supported across {num_processes} processes: use train.placement=colocated",
                          keys=("train.placement",))
    n = int(num_devices) // (2 if separate else 1)
    per_model = " per model, train.placement separate" if separate else ""
    data, fsdp = t.mesh_data, t.mesh_fsdp
    keys = ("train.mesh_data", "train.mesh_fsdp")
    for key, value in zip(keys, (data, fsdp)):
        if value == 0:
            raise ConfigError(f"{key}=0: expected a device count >= 1, or -1 for the devices left over", keys=(key,))
    if data == -1 and fsdp == -1:
        raise ConfigError("train.mesh_data=-1 and train.mesh_fsdp=-1: at most one axis can take the devices "
                          "left over", keys=keys)
    used = data * fsdp if -1 not in (data, fsdp) else max(data, fsdp)
    if (-1 in (data, fsdp) and n % used) or (-1 not in (data, fsdp) and used != n):
        raise ConfigError(f"train.mesh_data={data} x train.mesh_fsdp={fsdp} does not fit the {n} device(s)"
                          f"{per_model}: the mesh must use them all", keys=keys)
    if t.batch_size % n:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the number of devices ({n}{per_model}): "
                          "each device takes an equal share of every batch", keys=("train.batch_size",))
    if t.eval_batch_size is not None and t.eval_batch_size % n:
        raise ConfigError(f"train.eval_batch_size={t.eval_batch_size} is not divisible by the number of devices "
                          f"({n}{per_model}): each device takes an equal share of every batch",
                          keys=("train.eval_batch_size",))
