"""Configuration: frozen, keyword-only dataclasses, one per concern; YAML load/save; dotted overrides.

The defaults are the built-in demo (a tiny model on a built-in task), so `PPOConfig()` runs.

    config = load_config("experiments/configs/gpt2.yaml", ["ppo.kl_coef=0.1", "train.total_steps=20"])
    save_config(config, "runs/x/config.yaml")
    assert load_config("runs/x/config.yaml") == config

Loading goes through OmegaConf structured configs (merge of defaults <- YAML <- overrides, type
conversion, `${...}` interpolation); every failure becomes a one-line `ConfigError` that names the
source (`file:line` or the override), the dotted key, what is allowed and what was given.
Ranges and choices are declared next to each field (`_field(..., ge=0)`) and checked in
`__post_init__`, so a config built in Python is validated exactly like one read from YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException

from jaxppo.errors import ConfigError

__all__ = [
    "ModelConfig", "DataConfig", "RewardConfig", "RolloutConfig", "AdaptiveKLConfig", "PPOSectionConfig",
    "PlateauConfig", "OptimConfig", "TrainConfig", "EarlyStoppingConfig", "LoggingConfig", "PPOConfig",
    "load_config", "save_config", "config_to_dict", "describe_fields", "check_devices",
]


def _field(default: Any, help: str, *, choices: Sequence[Any] | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its one-line help and the allowed values (checked in `__post_init__`)."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=type(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- type checks

def _split_optional(tp: Any) -> tuple[bool, Any]:
    """`X | None` -> (True, X); anything else -> (False, tp)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _type_name(tp: Any) -> str:
    optional, tp = _split_optional(tp)
    if typing.get_origin(tp) is list:
        name = f"a list of {_type_name(typing.get_args(tp)[0])}"
    elif dataclasses.is_dataclass(tp):
        name = "a mapping"
    else:
        name = getattr(tp, "__name__", str(tp))
    return f"{name} or null" if optional else name


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Returns `value` checked against the annotation `tp` (ints become floats for float fields)."""
    optional, inner = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got null", keys=(key,))

    def bad() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})", keys=(key,))

    if inner is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise bad()
        return int(value)
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad()
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}", keys=(key,))
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if typing.get_origin(inner) is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        (item_type,) = typing.get_args(inner)
        return [_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, inner):
            raise ConfigError(f"{key}: expected {inner.__name__}, got {type(value).__name__}", keys=(key,))
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this file


def _check_range(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        allowed = "|".join(str(c) for c in choices)
        raise ConfigError(f"{key}={value!r} is not allowed: expected one of {allowed}", keys=(key,))
    for name, op, ok in (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
                         ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)):
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{key}={value!r} is out of range: expected {op} {bound}", keys=(key,))


class _Section:
    """Mixin: type and range checks of every field, then the section's own `_validate`."""

    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self._prefix}.{f.name}" if self._prefix else f.name
            value = _check_type(key, getattr(self, f.name), hints[f.name])
            _check_range(key, value, f.metadata)
            object.__setattr__(self, f.name, value)  # frozen: normalized value (int -> float, tuple -> list)
        self._validate()

    def _validate(self) -> None:
        """Checks that involve several fields of the section."""

    def _hash(self) -> int:
        """Hash with lists as tuples, so a whole PPOConfig can be a jit static argument or a dict key."""
        return hash(tuple(tuple(v) if isinstance(v, list) else v
                          for v in (getattr(self, f.name) for f in dataclasses.fields(self))))

    def _key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name


_SECTION = dict(frozen=True, kw_only=True)


# ----------------------------------------------------------------------------- sections

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


# ----------------------------------------------------------------------------- introspection

def _fields_of(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _help(f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    return f.metadata["help"] + (f" ({'|'.join(map(str, choices))})" if choices else "")


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


def _schema_at(path: Sequence[str]) -> Any:
    """The annotation of the dotted path (list indices allowed), or None if no such key."""
    tp: Any = PPOConfig
    for part in path:
        _, tp = _split_optional(tp)
        if re.fullmatch(r"\d+", part) and typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif dataclasses.is_dataclass(tp) and part in _fields_of(tp):
            tp = _fields_of(tp)[part][0]
        else:
            return None
    return tp


def _split_key(full_key: str) -> list[str]:
    return [p for p in re.split(r"[.\[\]]", full_key) if p]


def _suggest(path: Sequence[str]) -> str:
    """' (did you mean 'ppo.kl_coef'?)' for an unknown dotted key, or the list of valid keys."""
    parent = _split_optional(_schema_at(path[:-1]))[1]
    siblings = list(_fields_of(parent)) if dataclasses.is_dataclass(parent) else []
    prefix = ".".join(path[:-1]) + "." if len(path) > 1 else ""
    close = difflib.get_close_matches(path[-1], siblings, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    # the right name in another section: `train.kl_coef` -> `ppo.kl_coef`
    leaves = {key.rsplit(".", 1)[-1]: key for key, _, _ in reversed(describe_fields())}
    close = difflib.get_close_matches(path[-1], list(leaves), n=1, cutoff=0.8)
    if close:
        return f" (did you mean '{leaves[close[0]]}'?)"
    where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
    return f" (valid keys {where}: {', '.join(siblings)})"


def _check_keys(raw: Any, cls: type, path: list[str]) -> None:
    """Unknown keys and mappings where a section is expected, before OmegaConf sees the values."""
    for name, value in raw.items():
        here = path + [str(name)]
        key = ".".join(here)
        fields = _fields_of(cls)
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}'{_suggest(here)}", keys=(key,))
        optional, inner = _split_optional(fields[name][0])
        if dataclasses.is_dataclass(inner):
            if value is None and optional:
                continue
            if not isinstance(value, Mapping):
                what = "null" if value is None else repr(value)
                raise ConfigError(f"{key}: expected a mapping of {key}.* fields, got {what}", keys=(key,))
            _check_keys(value, inner, here)
        elif typing.get_origin(inner) is list and value is not None and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(fields[name][0])}, got {value!r}", keys=(key,))


# ----------------------------------------------------------------------------- load / save

class _Layer:
    """One source of values (the YAML file or one override): its plain dict and where each key sits."""

    def __init__(self, values: dict, origins: dict[str, str]):
        self.values = values
        self.origins = origins

    def lookup(self, path: Sequence[str]) -> tuple[bool, Any]:
        node: Any = self.values
        for part in path:
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return False, None
        return True, node


def _yaml_lines(node: yaml.Node, prefix: str, out: dict[str, str], where: str) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = f"{where}:{key_node.start_mark.line + 1}"
            _yaml_lines(value_node, key + ".", out, where)


def _keep_text(value: Any, node: yaml.Node | None, tp: Any) -> Any:
    """The source text for str fields that YAML read as another type (`output_dir: yes` stays 'yes', not 'True')."""
    inner = _split_optional(tp)[1]
    if inner is str and isinstance(node, yaml.ScalarNode) and isinstance(value, (bool, int, float)):
        return node.value
    if typing.get_origin(inner) is list and isinstance(node, yaml.SequenceNode) and isinstance(value, list):
        item_type = typing.get_args(inner)[0]
        return [_keep_text(v, n, item_type) for v, n in zip(value, node.value)]
    if dataclasses.is_dataclass(inner) and isinstance(node, yaml.MappingNode) and isinstance(value, dict):
        fields = _fields_of(inner)
        for key_node, value_node in node.value:
            name = key_node.value
            if name in fields and name in value:
                value[name] = _keep_text(value[name], value_node, fields[name][0])
    return value


def _read_yaml(path: str) -> _Layer:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None and not isinstance(root, yaml.MappingNode):
            kind = {yaml.SequenceNode: "a list"}.get(type(root), "a scalar")
            raise ConfigError(f"{path}:{root.start_mark.line + 1}: the top level must be a mapping of sections "
                              f"({', '.join(f.name for f in dataclasses.fields(PPOConfig))}), got {kind}")
        # OmegaConf's own loader: floats like 1e-6, duplicate keys rejected
        values = OmegaConf.to_container(OmegaConf.create(text), resolve=False) if root is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        loc = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{loc}: invalid YAML: {' '.join(str(problem).split())}") from None
    origins: dict[str, str] = {}
    if root is not None:
        _yaml_lines(root, "", origins, path)
        _keep_text(values, root, PPOConfig)
    return _Layer(values, origins)


_KEY_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _parse_override(item: str) -> _Layer:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} has no '=': expected key.sub=value, e.g. ppo.kl_coef=0.1")
    key, text = (part.strip() for part in item.split("=", 1))
    if not _KEY_RE.fullmatch(key):
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted config key like ppo.kl_coef")
    try:
        values = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={text}"]), resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as e:
        problem = getattr(e, "problem", None) or _first_line(e)
        raise ConfigError(f"override {item!r}: cannot parse the value: {problem}") from None
    where = f"override '{item}'"
    parts = key.split(".")
    leaf = values
    for part in parts[:-1]:
        leaf = leaf[part]
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        node = None
    if _schema_at(parts) is not None:
        leaf[parts[-1]] = _keep_text(leaf[parts[-1]], node, _schema_at(parts))
    return _Layer(values, {".".join(parts[:i]): where for i in range(1, len(parts) + 1)})


def _first_line(e: BaseException) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return str(msg).strip().splitlines()[0] if str(msg).strip() else type(e).__name__


def _locate(layers: Sequence[_Layer], keys: Iterable[str]) -> str:
    """'file.yaml:12: ' or "override 'k=v': " for the last layer that set one of `keys`."""
    for key in keys:
        for layer in reversed(layers):
            if key in layer.origins:
                return layer.origins[key] + ": "
    return ""


def _convert(e: OmegaConfBaseException, layers: Sequence[_Layer]) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    path = _split_key(key)
    if isinstance(e, ConfigKeyError) and path:
        return ConfigError(f"{_locate(layers, [key])}unknown config key '{key}'{_suggest(path)}", keys=(key,))
    if isinstance(e, InterpolationResolutionError):
        where = _locate(layers, [key])
        return ConfigError(f"{where}{key}: cannot resolve interpolation: {_first_line(e)}", keys=(key,))
    tp = _schema_at(path) if path else None
    found, value = False, None
    for layer in reversed(layers):
        found, value = layer.lookup(path)
        if found:
            break
    where = _locate(layers, [".".join(path[:i]) for i in range(len(path), 0, -1)])
    if path and tp is not None and found:
        shown = "null" if value is None else repr(value)
        return ConfigError(f"{where}{key}: expected {_type_name(tp)}, got {shown}", keys=(key,))
    return ConfigError(f"{where}{key + ': ' if key else ''}{_first_line(e)}", keys=(key,) if key else ())


def _merge_into(target: dict, values: Mapping) -> None:
    """Deep merge of plain mappings: values of `values` replace those of `target` (lists whole)."""
    for key, value in values.items():
        if isinstance(value, Mapping):
            if not isinstance(target.get(key), dict):
                target[key] = {}          # a fresh dict: the layers' own values are never modified
            _merge_into(target[key], value)
        else:
            target[key] = value


def _writable(node: DictConfig) -> DictConfig:
    """`node` with the read-only flag cleared on it and every mapping below it: OmegaConf marks the
    nodes of frozen dataclasses (the sections) read-only, and omegaconf 2.3.0 then refuses to merge
    values into them (2.4 merges anyway). The result is still built by the frozen dataclasses."""
    OmegaConf.set_readonly(node, False)
    if not node._is_none():  # an optional section left null (ppo.adaptive_kl)
        for _, child in node.items_ex(resolve=False):
            if isinstance(child, DictConfig):
                _writable(child)
    return node


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> PPOConfig:
    """Defaults <- YAML file at `path` <- dotted `overrides` (`["ppo.kl_coef=0.1", ...]`, YAML values).

    Raises ConfigError (one line, naming file:line or the override, the key, expected vs got).
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    layers: list[_Layer] = []
    if path is not None:
        layers.append(_read_yaml(os.fspath(path)))
    layers.extend(_parse_override(item) for item in overrides)
    for layer in layers:
        try:
            _check_keys(layer.values, PPOConfig, [])
        except ConfigError as e:
            raise ConfigError(f"{_locate([layer], e.keys)}{e}", keys=e.keys) from None
    try:
        # the layers are merged as plain values first, so a later layer replaces a bad earlier value
        # (an override fixes the YAML) and an error names the layer whose value is in effect
        combined: dict = {}
        for layer in layers:
            _merge_into(combined, layer.values)
        merged = OmegaConf.merge(_writable(OmegaConf.structured(PPOConfig)), OmegaConf.create(combined))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _convert(e, layers) from None
    except ConfigError as e:  # raised by a __post_init__: say where the offending value came from
        raise ConfigError(f"{_locate(layers, e.keys)}{e}", keys=e.keys) from None
    assert isinstance(config, PPOConfig)
    return config


def config_to_dict(config: PPOConfig) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-able) of a config."""
    return dataclasses.asdict(config)


def config_to_yaml(config: PPOConfig) -> str:
    """The fully resolved config as YAML text (every field, defaults included)."""
    return OmegaConf.to_yaml(OmegaConf.create(config_to_dict(config)), sort_keys=False)


def save_config(config: PPOConfig, path: str | os.PathLike) -> None:
    """Writes the fully resolved YAML atomically; `load_config(path) == config`."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("# jaxppo config (fully resolved): python -m jaxppo.train --config this.yaml\n")
        fh.write(config_to_yaml(config))
    os.replace(tmp, path)


def check_devices(config: PPOConfig, num_devices: int) -> None:
    """Raises ConfigError unless the device mesh and the batch sizes fit `num_devices` devices.

    The mesh (train.mesh_data x train.mesh_fsdp, -1 = the devices left over) must use every device,
    and each batch is split evenly over all of them: train.batch_size and train.eval_batch_size
    must be multiples of the device count. Called by `PPOTrainer` before it loads any model.
    """
    t, n = config.train, int(num_devices)
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
        raise ConfigError(f"train.mesh_data={data} x train.mesh_fsdp={fsdp} does not fit the {n} device(s): "
                          f"the mesh must use them all", keys=keys)
    if t.batch_size % n:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the number of devices ({n}): "
                          "each device takes an equal share of every batch", keys=("train.batch_size",))
    if t.eval_batch_size is not None and t.eval_batch_size % n:
        raise ConfigError(f"train.eval_batch_size={t.eval_batch_size} is not divisible by the number of devices "
                          f"({n}): each device takes an equal share of every batch", keys=("train.eval_batch_size",))
