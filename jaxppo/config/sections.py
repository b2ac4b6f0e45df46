"""The config sections: frozen, keyword-only dataclasses, one per concern; `PPOConfig` holds them all
and its defaults are the built-in demo."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from jaxppo.config.algorithm import GROUP_ADVANTAGES, AlgoConfig, OptimConfig, PPOSectionConfig
from jaxppo.config.fields import Section, default_of, fields_of, help_of, option, split_optional
from jaxppo.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class LoraConfig(Section):
    _prefix: ClassVar[str] = "model.lora"
    rank: int = option(8, "rank r of every adapter", ge=1)
    alpha: float = option(16.0, "scale numerator: the adapters' output is multiplied by alpha / rank", gt=0.0)
    dropout: float = option(0.0, "dropout on the adapters' input in the update's training forward", ge=0.0, lt=1.0)
    target_modules: list[str] = option(["all-linear"],
        "HF projection names that get adapters (llama family: q_proj k_proj v_proj o_proj gate_proj up_proj "
        "down_proj; gpt2: c_attn c_proj c_fc) or all-linear (every projection, never the LM head)")
    modules_to_save: list[str] = option([],
        "modules trained in full beside the adapters, PEFT's modules_to_save (llama family: norm embed_tokens "
        "lm_head; gpt2: ln_f wte wpe): a random tiny model's output distribution can only sharpen through them")
    critic: bool = option(False,
        "the critic trains adapters (and its value head) over a frozen backbone too; false = a fully trained critic")

    def _validate(self) -> None:
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules is empty: name projections or all-linear",
                              keys=("model.lora.target_modules",))


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    _prefix: ClassVar[str] = "model"
    policy: str = option("tiny",
        "policy: HF folder (config.json + safetensors + tokenizer), a Hub id 'org/name[@revision]' (the "
        "Hugging Face cache, else a download unless HF_HUB_OFFLINE=1), or 'tiny' to generate a tiny random model")
    tiny_arch: str = option("gpt2",
        "architecture of the generated tiny model when policy is 'tiny'", choices=("gpt2", "llama", "qwen2"))
    reward_model: str | None = option(None,
        "HF folder or Hub id of a sequence-classification reward model ('tiny' = a random tiny one); "
        "null = reward functions/task only")
    critic_init: str = option("policy",
        "where the critic (value model) starts from", choices=("reward_model", "policy"))
    critic: str | None = option(None,
        "HF sequence-classification folder or Hub id to start the critic from (overrides critic_init), "
        "e.g. a separate value model")
    dtype: str = option("float32",
        "compute dtype of every model; the trained models' weights, Adam moments and gradients stay float32 "
        "(master weights), the frozen reward model is stored in it", choices=("float32", "bfloat16"))
    ref_dtype: str | None = option(None,
        "dtype of the frozen reference policy; null = same as dtype", choices=("float32", "bfloat16"))
    remat: bool = option(False, "rematerialize (gradient-checkpoint) each transformer block to save memory")
    lora: LoraConfig | None = option(None,
        "LoRA {rank, alpha, dropout, target_modules, critic}: train adapters over the frozen base (the reference "
        "policy is the base with the adapters off: no second copy); null = full fine-tuning")
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
    columns: list[str] | None = option(None,
        "fields of a dataset row (besides the prompt) passed to the reward functions as keyword arguments; "
        "null = all of them")

    __hash__ = Section.field_hash   # a list field

    def _validate(self) -> None:
        if not self.prompt_field:
            raise ConfigError("data.prompt_field is empty: expected a JSON field name", keys=("data.prompt_field",))


@dataclass(frozen=True, kw_only=True)
class OverlongConfig(Section):
    _prefix: ClassVar[str] = "reward.overlong"
    max_length: int = option(32, "responses longer than this get the whole penalty (DAPO's L_max)", ge=1)
    buffer: int = option(8, "the penalty grows linearly over the last `buffer` tokens before max_length", ge=0)
    penalty: float = option(1.0, "the penalty at and beyond max_length (subtracted from the score)", ge=0.0)

    def _validate(self) -> None:
        if self.buffer > self.max_length:
            raise ConfigError(f"reward.overlong.buffer={self.buffer} exceeds reward.overlong.max_length="
                              f"{self.max_length}", keys=("reward.overlong.buffer",))


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
    error_penalty: float = option(-1.0,
        "with on_error=penalty, the reward functions' score of a response one of them failed on (raised or "
        "returned a non-finite value): the whole score of the row, not times the function's weight")
    overlong: OverlongConfig | None = option(None,
        "DAPO's soft overlong punishment {max_length, buffer, penalty}; null = off")

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
    stop_token_ids: list[int] = option([],
        "token ids that count as EOS besides the tokenizer's EOS and generation_config.json's eos_token_id")
    missing_eos_penalty: float | None = option(None,
        "subtracted from the score of responses without an EOS among their tokens (whatever stop_at_eos "
        "says); null = off", ge=0.0)
    forward_batch_size: int | None = option(None,
        "micro-batch of the no-grad scoring forwards; null = whole batch", ge=1)
    num_generations: int = option(1,
        "samples per prompt (G): an iteration trains on train.batch_size x G responses, a prompt's G samples "
        "consecutive, its prompt prefilled once and the KV cache shared", ge=1)
    decode_bucket: int = option(128,
        "KV-cache slots per decode bucket: the cache grows by this many as responses fill it, so a decode "
        "step attends to the filled slots, not all max_prompt_length + max_new_tokens; 0 = the whole cache "
        "from the start (no copy of it at each bucket boundary, where old and new briefly coexist)", ge=0)

    __hash__ = Section.field_hash   # a list field

    def _validate(self) -> None:
        bad = [t for t in self.stop_token_ids if t < 0]
        if bad:
            raise ConfigError(f"rollout.stop_token_ids has {bad[0]}: expected token ids >= 0",
                              keys=("rollout.stop_token_ids",))


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
    save_every: int = option(0, "checkpoint every N iterations; 0 = by time only (save_every_minutes)", ge=0)
    save_every_minutes: float = option(10.0,
        "also checkpoint when this many minutes have passed since the last checkpoint; 0 = off. A run "
        "also saves on SIGTERM/SIGINT, before exiting on a caught error, and at the end", ge=0.0)
    keep_checkpoints: int = option(3, "most recent checkpoints kept", ge=1)
    async_eval: bool = option(True,
        "evaluate in the background while the next step trains (holds a copy of the policy weights "
        "meanwhile); early stopping on an eval/ metric always waits for it")
    eval_batch_size: int | None = option(None,
        "prompts per evaluation batch; null = all eval prompts at once, up to 4 x batch_size", ge=1)
    max_tokens_per_microbatch: int | None = option(None,
        "padding-free update: each minibatch's sequences (prompt without its left padding, response up "
        "to its last valid token) are packed into rows of the padded length, and micro-batches of this "
        "many tokens (whole rows, at least one) run only while they hold a sequence, so the update's "
        "time follows the real tokens; replaces optim.grad_accum_steps' split. null = every response "
        "padded to rollout.max_new_tokens", ge=1)
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
    algo: AlgoConfig = option(AlgoConfig(), "RL algorithm: advantage estimator, loss aggregation, dynamic sampling")
    ppo: PPOSectionConfig = option(PPOSectionConfig(), "PPO algorithm")
    optim: OptimConfig = option(OptimConfig(), "optimizer")
    train: TrainConfig = option(TrainConfig(), "training loop")
    early_stopping: EarlyStoppingConfig = option(EarlyStoppingConfig(), "early stopping")
    logging: LoggingConfig = option(LoggingConfig(), "logging")

    @property
    def rollout_batch_size(self) -> int:
        """Responses per iteration: train.batch_size prompts x rollout.num_generations."""
        return self.train.batch_size * self.rollout.num_generations

    @property
    def minibatch_size(self) -> int:
        """Sequences per optimizer update: rollout_batch_size / num_minibatches."""
        return self.rollout_batch_size // self.ppo.num_minibatches

    @property
    def kl_estimator(self) -> str:
        """ppo.kl_estimator, or its default where the KL goes (k1 in the reward, k3 in the loss)."""
        return self.ppo.kl_estimator or ("k3" if self.ppo.kl_in == "loss" else "k1")

    @property
    def microbatch_size(self) -> int:
        """Sequences per gradient computation: minibatch_size / grad_accum_steps."""
        return self.minibatch_size // self.optim.grad_accum_steps

    def replace(self, **changes: Any) -> PPOConfig:
        """`dataclasses.replace` (sections are replaced whole: `c.replace(ppo=replace(c.ppo, kl_coef=0.1))`)."""
        return dataclasses.replace(self, **changes)

    def _validate(self) -> None:
        b, m, a = self.train.batch_size, self.ppo.num_minibatches, self.optim.grad_accum_steps
        g = self.rollout.num_generations
        rows, what = (b * g, f"train.batch_size x rollout.num_generations={b}x{g}") if g > 1 else (b, f"train.batch_size={b}")
        if rows % m:
            raise ConfigError(f"{what} is not divisible by ppo.num_minibatches={m}",
                              keys=("train.batch_size", "ppo.num_minibatches"))
        if (rows // m) % a:
            raise ConfigError(f"minibatch size {what.split('=')[0]}/ppo.num_minibatches={rows // m} is not divisible "
                              f"by optim.grad_accum_steps={a}", keys=("optim.grad_accum_steps", "train.batch_size"))
        fb = self.rollout.forward_batch_size
        if fb is not None and rows % fb:
            raise ConfigError(f"{what} is not divisible by rollout.forward_batch_size={fb}",
                              keys=("rollout.forward_batch_size", "train.batch_size"))
        adv = self.algo.advantage
        if (adv in GROUP_ADVANTAGES or self.algo.filter_groups) and g < 2:
            what = f"algo.advantage={adv}" if adv in GROUP_ADVANTAGES else "algo.filter_groups=true"
            raise ConfigError(f"{what} compares the samples of a prompt with each other: it needs "
                              f"rollout.num_generations >= 2, got {g}", keys=("rollout.num_generations",))
        if self.algo.critic_free and self.train.placement == "separate":
            raise ConfigError(f"train.placement=separate puts the critic on devices of its own, but "
                              f"algo.advantage={adv} trains no critic: use auto or colocated",
                              keys=("train.placement", "algo.advantage"))
        if self.train.max_tokens_per_microbatch is not None and a > 1:
            raise ConfigError(f"train.max_tokens_per_microbatch={self.train.max_tokens_per_microbatch} sizes the "
                              f"update's micro-batches itself: it replaces optim.grad_accum_steps={a} (set it to 1)",
                              keys=("train.max_tokens_per_microbatch", "optim.grad_accum_steps"))
        if self.ppo.kl_in == "loss" and self.ppo.adaptive_kl is not None:
            raise ConfigError("ppo.adaptive_kl steers the KL penalty in the reward; with ppo.kl_in=loss the "
                              "coefficient is ppo.kl_coef, fixed", keys=("ppo.adaptive_kl", "ppo.kl_in"))
        eb = self.train.eval_batch_size
        if fb is not None and eb is not None and eb % fb:
            raise ConfigError(f"train.eval_batch_size={eb} is not divisible by rollout.forward_batch_size={fb}",
                              keys=("rollout.forward_batch_size", "train.eval_batch_size"))
        if self.model.critic_init == "reward_model" and self.model.reward_model is None:
            raise ConfigError("model.critic_init=reward_model needs model.reward_model (got null)",
                              keys=("model.critic_init", "model.reward_model"))
        es = self.early_stopping.metric
        if es is not None and es.startswith("eval/") and not self.train.eval_every:
            raise ConfigError(f"early_stopping.metric={es} is measured by evaluations, and train.eval_every=0 "
                              f"evaluates only at the end: set train.eval_every > 0",
                              keys=("early_stopping.metric", "train.eval_every"))
        # "no reward source" is checked by PPOTrainer: Python callers may pass reward functions directly
        # (and "train.eval_every without eval prompts" too: they may pass an eval dataset)


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
