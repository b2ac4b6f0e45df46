"""What a resumed run may change: every config field is classified here, once.

A resume is the same run: `--resume` reads the run's own config, and a field that would break it
(the models, the data, the batch, the seed, the algorithm, the optimizer, the devices' layout) is
FIXED: a resume that changes one is refused, naming each field and both values. A CHANGEABLE field
(how long to run, how often to evaluate, save and log, early stopping, logging, where the run
lives) is applied and recorded beside the run's config.yaml.

    changes = resume_changes(saved, config, where="runs/demo")   # ConfigError on a FIXED change
    # -> {"train.total_steps": (120, 200)}

`tests/config/test_resume_rules.py` checks that `RULES` names every field of `PPOConfig`, so a
new field must be classified here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxppo.errors import ConfigError

FIXED, CHANGEABLE = "fixed", "changeable"


def _rules(rule: str, section: str, names: str) -> dict[str, str]:
    return {f"{section}.{name}": rule for name in names.split()}


# every dotted field of PPOConfig -> FIXED | CHANGEABLE (an optional sub-section is listed itself
# and with its fields: `ppo.adaptive_kl` null -> set is a change of `ppo.adaptive_kl`)
RULES: dict[str, str] = {
    **_rules(FIXED, "model", "policy tiny_arch reward_model critic_init critic dtype ref_dtype remat "
                             "logits_chunk_mb lora lora.rank lora.alpha lora.dropout lora.target_modules "
                             "lora.modules_to_save lora.critic"),
    **_rules(FIXED, "data", "prompts eval_prompts eval_fraction max_prompt_length truncation prompt_field "
                            "use_chat_template shuffle columns"),
    **_rules(FIXED, "reward", "task functions weights clip normalize overlong overlong.max_length "
                              "overlong.buffer overlong.penalty"),
    # what a failing reward function costs: a run that stopped on one may resume with a penalty
    **_rules(CHANGEABLE, "reward", "on_error error_penalty"),
    **_rules(FIXED, "rollout", "max_new_tokens temperature top_k top_p stop_at_eos missing_eos_penalty "
                               "forward_batch_size num_generations stop_token_ids"),
    # how the decode loop is split: the same samples (log-probs within float rounding)
    **_rules(CHANGEABLE, "rollout", "decode_bucket"),
    **_rules(FIXED, "algo", "advantage scale_rewards loss_agg filter_groups max_sample_rounds"),
    # kl_coef too: the (adaptive) coefficient lives in the checkpointed state, so a new value
    # would be silently ignored
    **_rules(FIXED, "ppo", "epochs num_minibatches clip_eps clip_eps_high dual_clip clip_value vf_coef "
                           "ent_coef gamma lam kl_coef kl_estimator kl_in adaptive_kl adaptive_kl.target "
                           "adaptive_kl.horizon whiten_advantages"),
    **_rules(FIXED, "optim", "lr critic_lr schedule warmup_steps min_lr_ratio weight_decay max_grad_norm "
                             "grad_accum_steps adam_b1 adam_b2 adam_eps plateau.metric plateau.mode "
                             "plateau.factor plateau.patience plateau.cooldown plateau.min_scale "
                             "plateau.rtol plateau.atol"),
    **_rules(FIXED, "train", "batch_size seed deterministic mesh_data mesh_fsdp placement "
                             "max_tokens_per_microbatch"),
    # total_steps: a linear/cosine schedule then decays over the new length from here on
    **_rules(CHANGEABLE, "train", "total_steps output_dir eval_every save_every save_every_minutes "
                                  "keep_checkpoints async_eval eval_batch_size max_nonfinite_steps "
                                  "log_every num_samples_logged"),
    **_rules(CHANGEABLE, "early_stopping", "metric mode patience min_delta"),
    **_rules(CHANGEABLE, "logging", "tensorboard wandb wandb_project wandb_mode progress_bar"),
}


def rule_of(key: str) -> str:
    """FIXED or CHANGEABLE for a dotted key (a key inside an optional sub-section follows the
    section's own rule when it has none); an unclassified key counts as FIXED."""
    while key:
        if key in RULES:
            return RULES[key]
        key = key.rpartition(".")[0]
    return FIXED


def config_diff(saved: Any, given: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, given value) of every field that differs between two configs
    (PPOConfig or their plain dicts); a list or a null-vs-set section differs as a whole."""
    def plain(c):
        return c if isinstance(c, dict) else dataclasses.asdict(c)

    out: list[tuple[str, Any, Any]] = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in list(a) + [k for k in b if k not in a]:
                walk(a.get(k), b.get(k), f"{prefix}{k}.")
        elif a != b:
            out.append((prefix[:-1], a, b))

    walk(plain(saved), plain(given), "")
    return out


def resume_changes(saved: Any, given: Any, where: str) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, given)} of the CHANGEABLE fields in which `given` differs from the run's
    `saved` config. Raises one ConfigError naming every FIXED field that differs, with both values."""
    diff = config_diff(saved, given)
    fixed = [(k, a, b) for k, a, b in diff if rule_of(k) == FIXED]
    if fixed:
        what = "a different model" if any(k.startswith("model.") for k, _, _ in fixed) else "changed settings"
        fields = "; ".join(f"{k}: run has {a!r}, given {b!r}" for k, a, b in fixed)
        raise ConfigError(f"refusing to resume {where} with {what}: {fields} (these cannot change within a run: "
                          f"drop them to continue with the run's values, or start a new run in another folder)",
                          keys=tuple(k for k, _, _ in fixed))
    return {k: (a, b) for k, a, b in diff}
