"""Configuration: frozen, keyword-only dataclasses, one per concern; YAML load/save; dotted overrides.

The defaults are the built-in demo (a tiny model on a built-in task), so `PPOConfig()` runs.

    config = load_config("experiments/configs/gpt2.yaml", ["ppo.kl_coef=0.1", "train.total_steps=20"])
    save_config(config, "runs/x/config.yaml")
    assert load_config("runs/x/config.yaml") == config

Loading goes through OmegaConf structured configs (merge of defaults <- YAML <- overrides, type
conversion, `${...}` interpolation); every failure becomes a one-line `ConfigError` that names the
source (`file:line` or the override), the dotted key, what is allowed and what was given.
Ranges and choices are declared next to each field (`option(..., ge=0)`) and checked in
`__post_init__`, so a config built in Python is validated exactly like one read from YAML.

`fields.py` holds that machinery, `sections.py` the dataclasses, `loading.py` YAML and overrides,
`devices.py` what a config asks of the devices (`check_devices`, `resolve_placement`).
This package is a leaf: it imports nothing of jaxppo but `jaxppo.errors`.
"""

from jaxppo.config.devices import check_devices, resolve_placement
from jaxppo.config.loading import (
    config_to_dict,
    config_to_yaml,
    load_config,
    save_config,
)
from jaxppo.config.algorithm import (
    AdaptiveKLConfig,
    AlgoConfig,
    OptimConfig,
    PlateauConfig,
    PPOSectionConfig,
)
from jaxppo.config.sections import (
    DataConfig,
    EarlyStoppingConfig,
    LoggingConfig,
    ModelConfig,
    OverlongConfig,
    PPOConfig,
    RewardConfig,
    RolloutConfig,
    TrainConfig,
    describe_fields,
)

__all__ = [
    "ModelConfig", "DataConfig", "RewardConfig", "RolloutConfig", "AdaptiveKLConfig", "PPOSectionConfig",
    "PlateauConfig", "OptimConfig", "TrainConfig", "AlgoConfig", "OverlongConfig", "EarlyStoppingConfig", "LoggingConfig", "PPOConfig",
    "load_config", "save_config", "config_to_dict", "config_to_yaml", "describe_fields", "check_devices",
    "resolve_placement",
]
