"""The algorithm's config sections: the advantage estimator and loss aggregation (`algo`), PPO's
clipped losses and KL (`ppo`, with the adaptive KL controller), and the optimiser (`optim`, with
reduce-on-plateau)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from jaxppo.config.fields import Section, option
from jaxppo.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class AdaptiveKLConfig(Section):
    _prefix: ClassVar[str] = "ppo.adaptive_kl"
    target: float = option(6.0, "KL (summed over the response) the adaptive controller steers towards", gt=0.0)
    horizon: int = option(10000, "controller horizon in samples (Ziegler et al. 2019)", ge=1)


ADVANTAGES = ("gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_ADVANTAGES = ("grpo", "rloo", "reinforce_pp_baseline")    # need G >= 2 samples per prompt
LOSS_AGG = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass(frozen=True, kw_only=True)
class AlgoConfig(Section):
    _prefix: ClassVar[str] = "algo"
    advantage: str = option("gae",
        "advantage estimator: gae (PPO, a learned critic), or critic-free: grpo, rloo, reinforce_pp, "
        "reinforce_pp_baseline (no critic is loaded or trained)", choices=ADVANTAGES)
    scale_rewards: str = option("group",
        "grpo: divide by the std of the group, of the batch, or not at all (none = Dr. GRPO)",
        choices=("group", "batch", "none"))
    loss_agg: str = option("token-mean",
        "how per-token losses become one number (verl's modes; TRL's dapo = token-mean, grpo = "
        "seq-mean-token-mean, dr_grpo = seq-mean-token-sum-norm)", choices=LOSS_AGG)
    filter_groups: bool = option(False,
        "DAPO's dynamic sampling: drop groups whose G rewards are all equal and sample again until the "
        "batch is full (or max_sample_rounds)")
    max_sample_rounds: int = option(4, "sampling rounds per iteration at most with filter_groups", ge=1)

    @property
    def critic_free(self) -> bool:
        return self.advantage != "gae"


@dataclass(frozen=True, kw_only=True)
class PPOSectionConfig(Section):
    _prefix: ClassVar[str] = "ppo"
    epochs: int = option(4, "optimization epochs over each rollout batch", ge=1)
    num_minibatches: int = option(2, "minibatches per epoch (train.batch_size must divide evenly)", ge=1)
    clip_eps: float = option(0.2, "policy ratio clip range", gt=0.0)
    clip_eps_high: float | None = option(None,
        "upper clip range of the ratio, 1 + clip_eps_high (DAPO's clip-higher); null = clip_eps", gt=0.0)
    dual_clip: float | None = option(None,
        "dual-clip constant c > 1: the loss of a token with a negative advantage is at most -c x advantage; "
        "null = off", gt=1.0)
    clip_value: float = option(0.2, "value prediction clip range around the old values", gt=0.0)
    vf_coef: float = option(0.1, "value loss coefficient", ge=0.0)
    ent_coef: float = option(0.0, "entropy bonus coefficient")
    gamma: float = option(1.0, "discount factor", ge=0.0, le=1.0)
    lam: float = option(0.95, "GAE lambda", ge=0.0, le=1.0)
    kl_coef: float = option(0.05, "KL penalty coefficient (initial value when adaptive_kl is on)", ge=0.0)
    kl_estimator: str | None = option(None,
        "per-token KL estimator; null = k1 in the reward, k3 in the loss", choices=("k1", "k2", "k3", "abs"))
    kl_in: str = option("reward",
        "where the KL to the reference goes: a per-token penalty in the reward (PPO), or a term of the "
        "policy loss (GRPO)", choices=("reward", "loss"))
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
