"""jaxppo: PPO for language models (RLHF) in JAX.

    from jaxppo import PPOConfig, PPOTrainer, PPODataset, load_prompts
    trainer = PPOTrainer(PPOConfig())           # the demo: tiny GPT-2, built-in `vowels` task
    trainer.train()

Names are imported lazily so `import jaxppo` stays cheap for the CLI's --help and error paths.
"""

import os as _os

# transformers warns at import that torch is absent; jaxppo uses it for tokenizers only
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# XLA:CPU's experimental YNNPACK fusions make this workload 1.5-2x slower on the CPUs measured here
# (experiments/README.md); keep XLA's own emitters unless the user chose otherwise. Must be set
# before JAX creates its CPU backend, i.e. before the first computation.
USER_SET_YNN = "xla_cpu_experimental_ynn_fusion_type" in _os.environ.get("XLA_FLAGS", "")
if not USER_SET_YNN:
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()

# XLA:CPU runs the operations of one program one at a time; two host devices let the policy's and
# the critic's programs run side by side (`train.placement`, experiments/README.md session 11).
# Only the CPU platform reads this flag; the user's own setting wins.
USER_SET_HOST_DEVICES = "xla_force_host_platform_device_count" in _os.environ.get("XLA_FLAGS", "")
if not USER_SET_HOST_DEVICES and (_os.cpu_count() or 1) >= 2:
    _os.environ["XLA_FLAGS"] = _os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2"

__version__ = "0.1.0"

_EXPORTS = {
    "PPOConfig": "jaxppo.config",
    "load_config": "jaxppo.config",
    "PPOTrainer": "jaxppo.run.trainer",
    "PPODataset": "jaxppo.data.prompts",
    "load_prompts": "jaxppo.data.prompts",
    "TrainingLogger": "jaxppo.run.logger",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxppo' has no attribute {name!r}")
