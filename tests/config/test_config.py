"""Config: defaults, YAML + overrides, one-line errors naming the key and source, save/load round trip."""

import dataclasses

import pytest

from jaxppo.config import (
    AdaptiveKLConfig, OptimConfig, PPOConfig, TrainConfig, config_to_dict, describe_fields, load_config, save_config,
)
from jaxppo.errors import ConfigError, JaxppoError


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_are_valid_and_frozen():
    config = PPOConfig()
    assert load_config() == config
    assert config.minibatch_size == config.train.batch_size // config.ppo.num_minibatches
    assert config.microbatch_size == config.minibatch_size // config.optim.grad_accum_steps
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.batch_size = 3
    with pytest.raises(TypeError):
        TrainConfig(60)  # keyword-only
    changed = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=8))
    assert changed.minibatch_size == 4 and config.train.batch_size == 16
    assert config.replace(optim=OptimConfig(lr=1e-4)).optim.lr == 1e-4
    assert hash(load_config(None, ["reward.functions=[m:f]"])) == hash(load_config(None, ["reward.functions=[m:f]"]))


def test_overrides_merge_into_the_read_only_nodes_of_frozen_sections(monkeypatch):
    """OmegaConf marks a frozen dataclass's node read-only; omegaconf 2.3.0 (inside the supported
    range) then refused every YAML value and override ("model.policy: expected str, got '/x'").
    load_config clears the flag on every mapping of the schema, the null optional sections too:
    here the schema is built read-only, as 2.3.0 builds it, and the merge must see none of it."""
    from omegaconf import DictConfig, OmegaConf

    def mappings(node, path=""):
        yield path, node
        if not node._is_none():
            for key, child in node.items_ex(resolve=False):
                if isinstance(child, DictConfig):
                    yield from mappings(child, f"{path}.{key}")

    structured, merge = OmegaConf.structured, OmegaConf.merge
    read_only_at_merge = []

    def read_only_structured(obj, *args, **kwargs):
        schema = structured(obj, *args, **kwargs)
        for _, node in mappings(schema):
            OmegaConf.set_readonly(node, True)
        return schema

    def spy_merge(schema, *others):
        read_only_at_merge.extend(path for path, node in mappings(schema) if node._get_flag("readonly"))
        return merge(schema, *others)

    monkeypatch.setattr(OmegaConf, "structured", read_only_structured)
    monkeypatch.setattr(OmegaConf, "merge", spy_merge)
    config = load_config(None, ["model.policy=/x/y", "ppo.adaptive_kl.target=3.0", "optim.plateau.patience=2"])
    assert (config.model.policy, config.ppo.adaptive_kl.target, config.optim.plateau.patience) == ("/x/y", 3.0, 2)
    assert read_only_at_merge == []


def test_describe_fields_covers_every_field_with_help():
    rows = describe_fields()
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert ("ppo.kl_coef", 0.05) in [(k, d) for k, d, _ in rows]
    assert {"ppo.adaptive_kl", "ppo.adaptive_kl.target", "optim.plateau.factor", "logging.wandb_mode"} <= set(keys)
    assert all(isinstance(h, str) and h and "\n" not in h for _, _, h in rows)
    assert "k1|k2|k3|abs" in dict((k, h) for k, _, h in rows)["ppo.kl_estimator"]
    # every key can be overridden on the command line with its own default
    optional = ("ppo.adaptive_kl", "reward.overlong", "model.lora")    # sub-sections that are null by default
    assert load_config(None, [f"{k}={'null' if d is None else d}" for k, d, _ in rows
                              if not any(k == o or k.startswith(o + ".") for o in optional)]) == PPOConfig()


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, """
ppo:
  kl_coef: 0.1
  adaptive_kl: {target: 3}
optim:
  lr: 1e-5          # YAML 1.1 would read this as a string
  plateau: {factor: 0.3}
reward:
  functions: ["mod:f", "mod:g"]
  weights: [1, 2]
""")
    config = load_config(path, ["ppo.kl_coef=0.2", "train.batch_size=8", "model.reward_model=/models/rm",
                                "rollout.missing_eos_penalty=1", "optim.max_grad_norm=null"])
    assert config.ppo.kl_coef == 0.2  # overrides win over the file
    assert config.ppo.adaptive_kl == AdaptiveKLConfig(target=3.0, horizon=10000)
    assert config.optim.lr == 1e-5 and isinstance(config.optim.lr, float)
    assert config.optim.plateau.factor == 0.3 and config.optim.plateau.patience == 5
    assert config.reward.functions == ["mod:f", "mod:g"] and config.reward.weights == [1.0, 2.0]
    assert config.train.batch_size == 8 and config.model.reward_model == "/models/rm"
    assert config.rollout.missing_eos_penalty == 1.0 and config.optim.max_grad_norm is None
    assert load_config(None, ["ppo.adaptive_kl.horizon=5"]).ppo.adaptive_kl == AdaptiveKLConfig(horizon=5)
    assert load_config(path, ["ppo.adaptive_kl=null"]).ppo.adaptive_kl is None
    assert load_config(None, [" ppo.kl_coef = 0.3"]).ppo.kl_coef == 0.3
    # str fields keep the text YAML would read as a bool or a number
    tricky = load_config(None, ["train.output_dir=yes", "reward.task=off", "model.policy=0123", "reward.functions=[on:f]"])
    assert (tricky.train.output_dir, tricky.reward.task, tricky.model.policy) == ("yes", "off", "0123")
    assert tricky.reward.functions == ["on:f"]
    assert load_config(write(tmp_path, "", "empty.yaml")) == PPOConfig()


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "train:\n  seed: 1\nppo:\n  kl_coeff: 0.1\n")
    msg = error_of(path)
    assert msg == f"{path}:4: unknown config key 'ppo.kl_coeff' (did you mean 'ppo.kl_coef'?)"
    assert "unknown config key 'ppo.kl_coeff' (did you mean 'ppo.kl_coef'?)" in error_of(None, ["ppo.kl_coeff=1"])
    assert "did you mean 'rollout.top_p'?" in error_of(None, ["ppo.top_p=0.9"])  # right name, wrong section
    assert "valid keys at the top level: model, data" in error_of(None, ["zzz=1"])


@pytest.mark.parametrize("override, expected", [
    ("ppo.kl_coef=abc", "ppo.kl_coef: expected float, got 'abc'"),
    ("train.total_steps=2.5", "train.total_steps: expected int, got 2.5"),
    ("logging.wandb=maybe", "logging.wandb: expected bool, got 'maybe'"),
    ("reward.functions=a:b", "reward.functions: expected a list of str, got 'a:b'"),
    ("ppo=3", "ppo: expected a mapping of ppo.* fields, got 3"),
    ("optim.lr=null", "optim.lr: expected float, got null"),
])
def test_wrong_type_names_key_expected_and_value(override, expected):
    assert error_of(None, [override]) == f"override '{override}': {expected}"


def test_wrong_type_in_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "ppo:\n  epochs: 2\n  kl_coef: abc\n")
    assert error_of(path) == f"{path}:3: ppo.kl_coef: expected float, got 'abc'"


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"),
    ("ppo.clip_eps=0", "ppo.clip_eps"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("data.eval_fraction=1", "data.eval_fraction"),
    ("ppo.kl_estimator=k4", "ppo.kl_estimator"),
    ("model.dtype=float16", "model.dtype"),
    ("ppo.adaptive_kl.target=-1", "ppo.adaptive_kl.target"),
    ("optim.plateau.factor=2", "optim.plateau.factor"),
])
def test_out_of_range_values(override, key):
    msg = error_of(None, [override])
    assert msg.startswith(f"override '{override}': {key}=")
    assert "expected" in msg


def test_out_of_range_in_python_and_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.lr=-1.0 is out of range: expected > 0"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"optim.lr: expected float, got '3e-6' \(str\)"):
        OptimConfig(lr="3e-6")
    path = write(tmp_path, "rollout:\n  temperature: -0.5\n")
    assert error_of(path).startswith(f"{path}:2: rollout.temperature=-0.5 is out of range")


def test_cross_field_checks(tmp_path):
    msg = error_of(write(tmp_path, "train:\n  batch_size: 15\n"))
    assert msg.endswith(":2: train.batch_size=15 is not divisible by ppo.num_minibatches=2")
    assert "not divisible by optim.grad_accum_steps=4" in error_of(None, ["train.batch_size=12",
                                                                           "optim.grad_accum_steps=4"])
    assert "model.critic_init=reward_model needs model.reward_model" in error_of(None, ["model.critic_init=reward_model"])
    assert "reward.weights has 1 entries but reward.functions has 2" in error_of(
        None, ["reward.functions=[m:f, m:g]", "reward.weights=[1]"])
    assert load_config(None, ["reward.task=null"]).reward.task is None   # PPOTrainer checks the reward source
    assert "expected 'module:function'" in error_of(None, ["reward.functions=[nocolon]"])
    assert load_config(None, ["reward.task=null", "model.reward_model=rm", "model.critic_init=reward_model"])


def test_bad_files_and_overrides(tmp_path):
    msg = error_of(write(tmp_path, "ppo:\n  epochs: 2\n  kl_coef: [1,\n"))
    assert msg.startswith(str(tmp_path / "config.yaml") + ":4:") and "invalid YAML" in msg
    assert "top level must be a mapping" in error_of(write(tmp_path, "- a\n- b\n"))
    assert "duplicate key" in error_of(write(tmp_path, "ppo:\n  epochs: 1\n  epochs: 2\n"))
    assert error_of(str(tmp_path / "nope.yaml")) == f"config file not found: {tmp_path / 'nope.yaml'}"
    assert "has no '='" in error_of(None, ["ppo.kl_coef"])
    assert "cannot parse the value" in error_of(None, ["ppo.kl_coef=[1"])
    assert "cannot resolve interpolation" in error_of(write(tmp_path, "ppo:\n  kl_coef: ${nope}\n"))
    assert issubclass(ConfigError, JaxppoError) and issubclass(ConfigError, ValueError)


def test_save_load_round_trip(tmp_path):
    config = load_config(None, ["ppo.adaptive_kl.target=2", "reward.functions=[m:f]", "reward.weights=[0.5]",
                                "optim.schedule=cosine", "optim.lr=1e-6", "train.output_dir=yes",
                                "early_stopping.metric=objective/scores", "rollout.forward_batch_size=4"])
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert load_config(path).train.output_dir == "yes"  # a string that YAML would read as a bool
    assert config_to_dict(config)["ppo"]["adaptive_kl"] == {"target": 2.0, "horizon": 10000}
    save_config(PPOConfig(), path)
    assert load_config(path) == PPOConfig()


def test_token_budget_micro_batches_refuse_grad_accum():
    with pytest.raises(ConfigError, match="max_tokens_per_microbatch=256.*grad_accum_steps=2"):
        load_config(None, ["train.max_tokens_per_microbatch=256", "optim.grad_accum_steps=2"])
    assert load_config(None, ["train.max_tokens_per_microbatch=256"]).train.max_tokens_per_microbatch == 256


def test_lora_section_from_overrides_and_its_checks():
    c = load_config(None, ["model.lora.rank=4", "model.lora.modules_to_save=[ln_f]"])
    assert c.model.lora.rank == 4 and c.model.lora.alpha == 16.0 and c.model.lora.target_modules == ["all-linear"]
    for bad, key in (("model.lora.rank=0", "model.lora.rank"), ("model.lora.dropout=1.0", "model.lora.dropout"),
                     ("model.lora.target_modules=[]", "model.lora.target_modules")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])
