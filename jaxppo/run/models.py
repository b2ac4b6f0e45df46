"""The models of a run, loaded from the config: `load_models(config) -> (Models, InitialParams)`.

The policy (trained), its frozen reference, the critic (trained; from the policy's backbone
with a fresh value head, from the reward model, or from a folder of its own) and the reward
model (optional), with the tokenizer they share and the stop and pad ids sampling uses.
`model.policy=tiny` and `model.reward_model=tiny` stand for cached tiny random checkpoints
(`tiny_model_dir`), which the demo and the tests use; a Hub id (`Qwen/Qwen2.5-0.5B-Instruct`)
is read from the Hugging Face cache (`jaxppo.models.hub.resolve_model`), tokenizer included.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxppo.engine.state import Frozen, ModelGraphs
from jaxppo.errors import ConfigError, one_line
from jaxppo.models import hf
from jaxppo.models.hub import resolve_model
from jaxppo.models.lora import LoraSpec, add_lora, merged_params, saved_modules, split_lora
from jaxppo.models.peft import save_adapter
from jaxppo.run.runfolder import replaced_atomically
from jaxppo.runtime import cache_root

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class InitialParams(NamedTuple):
    """The parameters `load_models` read (the trainer shards them into its state and drops these)."""

    policy: Any                    # nnx.State
    critic: Any                    # nnx.State; None for the critic-free estimators
    frozen: Frozen                 # reference (and reward model) parameters


@dataclasses.dataclass(frozen=True)
class Models:
    """What the run's models are, besides their parameters: graphs, tokenizer, ids, provenance."""

    graphs: ModelGraphs            # static NNX graphs the programs merge parameters into
    tokenizer: Any                 # transformers tokenizer of the policy's folder
    eos_ids: tuple[int, ...]       # ids that end a response
    pad_id: int
    policy_path: str               # resolved folder (`tiny` made concrete)
    reward_model_path: str | None
    critic_path: str | None        # the folder the critic starts from (None without a critic)
    policy_config: Any             # models.transformer.TransformerConfig
    critic_config: Any             # None without a critic
    reward_model_config: Any       # None without a reward model
    lora: LoraSpec | None = None   # model.lora: the policy (and a LoRA critic) train adapters


def tiny_model_dir(arch: str, seed: int = 0, reward_model: bool = False) -> str:
    """A cached tiny checkpoint (made once per arch/seed; the demo's default policy)."""
    from jaxppo.models.tiny import make_tiny

    root = cache_root()
    path = root / f"tiny-{arch}-{'rm' if reward_model else 'lm'}-s{seed}"
    if not (path / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        make_tiny(str(tmp), arch=arch, reward_model=reward_model, seed=seed)
        try:
            os.replace(tmp, path)              # atomic: a concurrent maker may have won, that's fine
        except OSError:
            pass
    return str(path)


def load_models(config) -> tuple[Models, InitialParams]:
    """Load the run's models as `config.model` says (ConfigError / ModelLoadError naming the
    folder at fault: missing files, a vocabulary the models do not share, a tokenizer larger than
    the embedding)."""
    c, seed = config.model, config.train.seed
    dtype = DTYPES[c.dtype]
    ref_dtype = DTYPES[c.ref_dtype or c.dtype]
    # a folder, `tiny`, or a Hugging Face Hub id (`org/name[@revision]`: the local cache, else a download)
    policy_path = (tiny_model_dir(c.tiny_arch, seed=seed) if c.policy == "tiny"
                   else resolve_model(c.policy, "model.policy"))
    # the trained models (policy, critic) keep float32 master weights whatever the compute dtype:
    # a bf16 weight would round an lr-1e-6 Adam step back to itself; frozen ones may be stored in it
    master = jnp.float32
    spec = lora_spec(c.lora)
    if spec is None:
        policy, tokenizer = hf.load_causal_lm(policy_path, dtype=dtype, param_dtype=master, remat=c.remat)
        ref, _ = hf.load_causal_lm(policy_path, dtype=ref_dtype, param_dtype=ref_dtype)
    else:   # one copy of the weights: frozen (stored in model.ref_dtype), the reference is the base without adapters
        policy, tokenizer = hf.load_causal_lm(policy_path, dtype=dtype, param_dtype=ref_dtype, remat=c.remat)
        ref = None
    rm_path = c.reward_model
    if rm_path == "tiny":     # a random tiny reward model sharing the tiny tokenizer (demos, tests)
        rm_path = tiny_model_dir(c.tiny_arch, seed=seed + 1, reward_model=True)
    elif rm_path:
        rm_path = resolve_model(rm_path, "model.reward_model")
    reward_model = None
    if rm_path:
        reward_model, rm_tok = hf.load_reward_model(rm_path, dtype=dtype)
        check_same_vocab(tokenizer, rm_tok, policy_path, rm_path)
    critic_lora = spec is not None and c.lora.critic and not config.algo.critic_free
    critic_dtype = ref_dtype if critic_lora else master      # a LoRA critic's backbone is frozen
    critic_path = None if config.algo.critic_free else rm_path if c.critic_init == "reward_model" else policy_path
    if config.algo.critic_free:
        critic = None             # grpo, rloo, reinforce_pp...: no value model is loaded or trained
    elif c.critic:
        critic_path = resolve_model(c.critic, "model.critic")
        critic, critic_tok = hf.load_reward_model(critic_path, dtype=dtype, param_dtype=critic_dtype, remat=c.remat)
        check_same_vocab(tokenizer, critic_tok, policy_path, critic_path)
    elif c.critic_init == "reward_model":
        critic, _ = hf.load_reward_model(rm_path, dtype=dtype, param_dtype=critic_dtype, remat=c.remat)
    else:
        critic = hf.load_model(policy_path, head="scalar", fresh_head=True, dtype=dtype, param_dtype=critic_dtype,
                               remat=c.remat, seed=seed)
    for model, path in ((policy, policy_path), (reward_model, c.reward_model), (critic, c.critic or "critic")):
        if model is not None and model.config.vocab_size < len(tokenizer):
            raise ConfigError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model embeds only "
                              f"{model.config.vocab_size} (vocab_size in config.json)")
    critic_base = None
    if spec is None:
        policy_graph, policy_params = nnx.split(policy)
        ref_graph, ref_params = nnx.split(ref)
    else:
        ref_graph, _ = nnx.split(policy)                 # the base model's graph: the reference policy
        policy_graph, policy_params, ref_params = split_lora(add_lora_checked(policy, spec, seed, c.policy),
                                                             trained_extra=saved_filter(policy.config, spec))
    if critic_lora:
        critic_graph, critic_params, critic_base = split_lora(add_lora_checked(critic, spec, seed + 2, "critic"),
                                                              trained_extra=nnx.PathContains("score"))
    else:
        critic_graph, critic_params = nnx.split(critic) if critic is not None else (None, None)
    rm_graph, rm_params = nnx.split(reward_model) if reward_model is not None else (None, None)
    eos = tokenizer.eos_token_id
    models = Models(
        graphs=ModelGraphs(policy=policy_graph, critic=critic_graph, ref=ref_graph, reward_model=rm_graph,
                           lora=spec is not None, critic_lora=critic_lora),
        tokenizer=tokenizer,
        eos_ids=stop_token_ids(tokenizer, policy_path, config.rollout.stop_token_ids),
        pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos),
        policy_path=policy_path, reward_model_path=rm_path, critic_path=critic_path, policy_config=policy.config,
        critic_config=None if critic is None else critic.config,
        reward_model_config=None if reward_model is None else reward_model.config, lora=spec)
    return models, InitialParams(policy=policy_params, critic=critic_params,
                                 frozen=Frozen(ref=ref_params, reward_model=rm_params, critic_base=critic_base))


def export_policy(models: Models, policy, base, path, adapter_path=None) -> None:
    """Write the trained policy as an HF folder at `path` (never seen half-written); with LoRA
    (`base` not None) the adapters merged into the base weights, and the adapters alone in PEFT's
    format at `adapter_path` when given. Host arrays or this process's whole arrays."""
    g = models.graphs
    model = nnx.merge(g.policy, policy) if base is None else nnx.merge(g.ref, merged_params(g.policy, base, policy))
    with replaced_atomically(path) as tmp:
        hf.save_pretrained(model, models.tokenizer, str(tmp))
    if base is not None and adapter_path is not None:
        with replaced_atomically(adapter_path) as tmp:
            save_adapter(policy, models.lora, models.policy_config, str(tmp), models.policy_path)


def describe_models(models: Models, state, frozen: Frozen) -> str:
    """The run log's line about the models: "policy PATH (0.15M params), critic 0.15M"."""
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree)) / 1e6
    policy = f"{count(state.policy):.2f}M params"
    if models.lora is not None:
        saved = f" + {', '.join(models.lora.modules_to_save)}" if models.lora.modules_to_save else ""
        policy = (f"{count(frozen.ref):.2f}M frozen, {count(state.policy):.3f}M trained: LoRA rank "
                  f"{models.lora.rank}{saved}")
    critic = "no critic" if state.critic is None else f"critic {count(state.critic):.2f}M"
    if models.graphs.critic_lora:
        critic += f" LoRA + {count(frozen.critic_base):.2f}M frozen"
    return f"policy {models.policy_path} ({policy}), {critic}"


def lora_spec(lora_cfg) -> LoraSpec | None:
    """`model.lora` (a `LoraConfig` or None) as the models' `LoraSpec`."""
    if lora_cfg is None:
        return None
    return LoraSpec(rank=lora_cfg.rank, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout,
                    target_modules=tuple(lora_cfg.target_modules), modules_to_save=tuple(lora_cfg.modules_to_save))


def saved_filter(config, spec: LoraSpec):
    """The NNX filter of the policy's `modules_to_save` (None when there are none)."""
    try:
        modules = saved_modules(config, spec.modules_to_save)
    except ValueError as e:
        raise ConfigError(str(e), keys=("model.lora.modules_to_save",)) from None
    return nnx.Any(*(nnx.PathContains(m) for m in modules.values())) if modules else None


def add_lora_checked(model, spec: LoraSpec, seed: int, name: str):
    """`add_lora`, a target the model does not have becoming a ConfigError that names it."""
    try:
        return add_lora(model, spec, rngs=nnx.Rngs(seed))
    except ValueError as e:
        raise ConfigError(f"{name}: {e}", keys=("model.lora.target_modules",)) from None


def stop_token_ids(tokenizer, folder: str, extra=()) -> tuple[int, ...]:
    """The ids that end a response, sorted: the tokenizer's EOS, `eos_token_id` of the folder's
    generation_config.json (an int or a list: chat models end turns with `<|im_end|>`, `<|eot_id|>`)
    and `extra` (rollout.stop_token_ids)."""
    ids = set(extra)
    for eos in (tokenizer.eos_token_id, _generation_eos(Path(folder) / "generation_config.json")):
        ids |= {eos} if isinstance(eos, int) else set(eos or ())
    return tuple(sorted(int(i) for i in ids))


def _generation_eos(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: not a readable generation config ({type(e).__name__}: {one_line(e)})") from None


def check_same_vocab(tok_a, tok_b, path_a, path_b):
    """The reward model and critic read the policy's token ids unchanged: vocabularies must agree."""
    if len(tok_a) != len(tok_b) or tok_a.get_vocab() != tok_b.get_vocab():
        raise ConfigError(f"tokenizer mismatch: {path_b} has a different vocabulary ({len(tok_b)} tokens) from the "
                          f"policy {path_a} ({len(tok_a)} tokens); the models must share one tokenizer")
