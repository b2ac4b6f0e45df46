"""What a resume may change (`jaxppo.config.resume`): every field classified, refusals that name
each field with both values."""

import dataclasses

import pytest

from jaxppo.config import AdaptiveKLConfig, PPOConfig, describe_fields
from jaxppo.config.resume import (
    CHANGEABLE,
    FIXED,
    RULES,
    config_diff,
    resume_changes,
    rule_of,
)
from jaxppo.errors import ConfigError


def test_every_field_is_classified():
    keys = {key for key, _, _ in describe_fields()}
    assert sorted(keys - set(RULES)) == [], "classify the new fields in jaxppo/config/resume.py"
    assert sorted(set(RULES) - keys) == [], "RULES names fields that do not exist"
    assert set(RULES.values()) == {FIXED, CHANGEABLE}


def test_the_rules_of_the_brief():
    for key in ("model.policy", "data.prompts", "reward.task", "rollout.temperature", "algo.advantage",
                "ppo.kl_coef", "optim.lr", "optim.schedule", "train.batch_size", "train.seed", "train.placement"):
        assert rule_of(key) == FIXED, key
    for key in ("train.total_steps", "train.eval_every", "train.save_every", "train.save_every_minutes",
                "train.output_dir", "reward.on_error", "early_stopping.patience", "logging.wandb"):
        assert rule_of(key) == CHANGEABLE, key
    assert rule_of("ppo.adaptive_kl.target") == FIXED and rule_of("no.such") == FIXED


def replace(config, **sections):
    return config.replace(**{name: dataclasses.replace(getattr(config, name), **fields)
                             for name, fields in sections.items()})


def test_a_fixed_change_is_refused_naming_each_field_and_both_values():
    saved = PPOConfig()
    given = replace(saved, ppo={"kl_coef": 0.1}, optim={"lr": 1e-5}, train={"total_steps": 500})
    with pytest.raises(ConfigError) as e:
        resume_changes(saved, given, "runs/x")
    msg = str(e.value)
    assert "\n" not in msg and "refusing to resume runs/x" in msg
    assert "ppo.kl_coef: run has 0.05, given 0.1" in msg and "optim.lr: run has 0.003, given 1e-05" in msg
    assert "total_steps" not in msg and set(e.value.keys) == {"ppo.kl_coef", "optim.lr"}
    with pytest.raises(ConfigError, match="with a different model: model.tiny_arch: run has 'gpt2', given 'llama'"):
        resume_changes(saved, replace(saved, model={"tiny_arch": "llama"}), "runs/x")


def test_changeable_fields_come_back_with_both_values():
    saved = PPOConfig()
    given = replace(saved, train={"total_steps": 500, "eval_every": 7}, early_stopping={"metric": "eval/objective/scores"})
    assert resume_changes(saved, given, "x") == {"train.total_steps": (120, 500), "train.eval_every": (0, 7),
                                                 "early_stopping.metric": (None, "eval/objective/scores")}
    assert resume_changes(saved, saved, "x") == {}


def test_an_optional_section_differs_as_a_whole():
    saved = PPOConfig()
    on = saved.replace(ppo=dataclasses.replace(saved.ppo, adaptive_kl=AdaptiveKLConfig(target=1.0, horizon=10)))
    assert config_diff(saved, on) == [("ppo.adaptive_kl", None, {"target": 1.0, "horizon": 10})]
