"""Set-up of a PPOTrainer: what it loads and builds from its config.

`BuildMixin` is the part of `PPOTrainer` that turns the config into objects: in `__init__`,
`_load_models` (policy, frozen reference, critic, reward model; their graphs and parameters),
`_build_reward_functions` (reward.task / reward.functions / Python callables) and `_build_programs`
(optimisers, the mesh, the sharded TrainState and `step.PPOPrograms`); in `train`, `_datasets`
(the train/eval prompts from the arguments or data.*). `tiny_model_dir` makes the cached tiny
checkpoints that `model.policy=tiny` and `model.reward_model=tiny` stand for.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxppo.data import tasks
from jaxppo.data.prompts import PPODataset, split_prompts
from jaxppo.errors import ConfigError
from jaxppo.models import hf
from jaxppo.engine.optimizer import make_optimizer
from jaxppo.engine.sampling import SamplingParams
from jaxppo.runtime import cache_root
from jaxppo.engine.mesh import make_meshes, shard_tree, tree_shardings
from jaxppo.engine.programs import Frozen, PPOPrograms, StepSettings, init_train_state
from jaxppo.engine.update import UpdateSettings

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


class BuildMixin:
    """`PPOTrainer`'s set-up steps, run in this order by `__init__`.

    Reads `self.config`. `_load_models` sets `tokenizer`, `eos_ids`, `pad_id`, `policy_path`,
    `policy_config`, `critic_config`, `reward_model`, `reward_model_path`, `frozen`, `_graphs`
    (read by `export`), `_template_policy` and `_init_params`; `_build_programs` consumes
    `_init_params` and sets `mesh`, `state` and `programs`."""

    def _load_models(self):
        # bad input that needs no model: fail before loading (and, on accelerators, sharding) anything
        from jaxppo.config import check_devices
        check_devices(self.config, jax.device_count(), jax.devices()[0].platform, jax.process_count())
        c = self.config.model
        dtype = _DTYPES[c.dtype]
        ref_dtype = _DTYPES[c.ref_dtype or c.dtype]
        policy_path = c.policy
        if policy_path == "tiny":
            policy_path = tiny_model_dir(c.tiny_arch, seed=self.config.train.seed)
        self.policy_path = policy_path
        policy, self.tokenizer = hf.load_causal_lm(policy_path, dtype=dtype, remat=c.remat)
        ref, _ = hf.load_causal_lm(policy_path, dtype=ref_dtype, param_dtype=ref_dtype)
        self.reward_model = None
        rm_path = c.reward_model
        if rm_path == "tiny":     # a random tiny reward model sharing the tiny tokenizer (demos, tests)
            rm_path = tiny_model_dir(c.tiny_arch, seed=self.config.train.seed + 1, reward_model=True)
        self.reward_model_path = rm_path
        if rm_path:
            self.reward_model, rm_tok = hf.load_reward_model(rm_path, dtype=dtype)
            _check_same_vocab(self.tokenizer, rm_tok, policy_path, rm_path)
        if c.critic:
            critic, critic_tok = hf.load_reward_model(c.critic, dtype=dtype, remat=c.remat)
            _check_same_vocab(self.tokenizer, critic_tok, policy_path, c.critic)
        elif c.critic_init == "reward_model":
            critic, _ = hf.load_reward_model(rm_path, dtype=dtype, remat=c.remat)
        else:
            critic = hf.load_model(policy_path, head="scalar", fresh_head=True, dtype=dtype, remat=c.remat,
                                   seed=self.config.train.seed)
        for model, path in ((policy, policy_path), (self.reward_model, c.reward_model), (critic, c.critic or "critic")):
            if model is not None and model.config.vocab_size < len(self.tokenizer):
                raise ConfigError(f"{path}: the tokenizer has {len(self.tokenizer)} tokens but the model embeds only "
                                  f"{model.config.vocab_size} (vocab_size in config.json)")
        self.policy_config = policy.config
        self.critic_config = critic.config
        self._graphs = {"policy": nnx.split(policy)[0], "critic": nnx.split(critic)[0],
                        "ref": nnx.split(ref)[0],
                        "rm": None if self.reward_model is None else nnx.split(self.reward_model)[0]}
        self._init_params = (nnx.split(policy)[1], nnx.split(critic)[1])
        self.frozen = Frozen(ref=nnx.split(ref)[1],
                             reward_model=None if self.reward_model is None else nnx.split(self.reward_model)[1])
        self._template_policy = policy     # a model object with the policy's graph (benchmarks merge into it)
        eos = self.tokenizer.eos_token_id
        self.eos_ids = tuple(sorted({eos} if isinstance(eos, int) else set(eos or ())))
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos)

    def _build_reward_functions(self, extra):
        r = self.config.reward
        fns: list[tuple[str, Callable, float]] = []
        if r.task:
            fns.append((f"task:{r.task}", tasks.get_task(r.task).reward, 1.0))
        weights = list(r.weights) or [1.0] * len(r.functions)
        for spec, w in zip(r.functions, weights):
            fns.append((spec, tasks.import_function(spec), float(w)))
        for fn in extra or ():
            fns.append((getattr(fn, "__name__", repr(fn)), fn, 1.0))
        return fns

    def _build_programs(self):
        c = self.config
        updates_per_iter = c.ppo.epochs * c.ppo.num_minibatches
        total_updates = c.train.total_steps * updates_per_iter
        ptx, psched = make_optimizer(c.optim, total_updates, updates_per_iteration=updates_per_iter)
        ctx, csched = make_optimizer(c.optim, total_updates, lr=c.optim.critic_lr or c.optim.lr,
                                     updates_per_iteration=updates_per_iter)
        rc = c.rollout
        sampling = SamplingParams(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_k=rc.top_k,
                                  top_p=rc.top_p, eos_token_ids=self.eos_ids if rc.stop_at_eos else (),
                                  pad_token_id=self.pad_id, stop_at_eos=rc.stop_at_eos)
        p, chunk_mb = c.ppo, c.model.logits_chunk_mb
        upd = UpdateSettings(epochs=p.epochs, num_minibatches=p.num_minibatches,
                             grad_accum_steps=c.optim.grad_accum_steps, clip_eps=p.clip_eps,
                             clip_value=p.clip_value, vf_coef=p.vf_coef, ent_coef=p.ent_coef,
                             temperature=rc.temperature or 1.0,
                             logits_chunk_bytes=None if chunk_mb is None else chunk_mb * 2**20)
        plateau_metric = c.optim.plateau.metric if c.optim.schedule == "plateau" else None
        settings = StepSettings(
            sampling=sampling, update=upd, gamma=p.gamma, lam=p.lam, kl_estimator=p.kl_estimator,
            adaptive_kl=None if p.adaptive_kl is None else (p.adaptive_kl.target, p.adaptive_kl.horizon),
            whiten_advantages=p.whiten_advantages, missing_eos_penalty=rc.missing_eos_penalty,
            reward_clip=c.reward.clip, normalize_rewards=c.reward.normalize,
            forward_batch_size=rc.forward_batch_size, plateau_metric=plateau_metric,
            plateau_sign=-1.0 if c.optim.plateau.mode == "max" else 1.0)
        # the policy's mesh and the critic's (the same one unless train.placement separates them):
        # batch over (data, fsdp), params/opt state FSDP-sharded
        self.mesh, self.critic_mesh = make_meshes(c.train.mesh_data, c.train.mesh_fsdp, c.train.placement)
        state = init_train_state(*self._init_params, (ptx, ctx), c.train.seed, p.kl_coef)
        del self._init_params
        self.state = state.replace(**{f.name: shard_tree(getattr(state, f.name), self.critic_mesh
                                                         if f.name in ("critic", "critic_opt") else self.mesh)
                                      for f in dataclasses.fields(state)})
        self.frozen = shard_tree(self.frozen, self.mesh)

        def pinned(params, opt, mesh):   # an update program's output shardings (None on one device)
            return (tree_shardings(params, mesh), tree_shardings(opt, mesh)) if mesh.devices.size > 1 else None

        self.programs = PPOPrograms(policy_graph=self._graphs["policy"], critic_graph=self._graphs["critic"],
                                    ref_graph=self._graphs["ref"], rm_graph=self._graphs["rm"],
                                    txs=(ptx, ctx), schedules=(psched, csched), settings=settings,
                                    updates_per_iteration=updates_per_iter,
                                    policy_shardings=pinned(self.state.policy, self.state.policy_opt, self.mesh),
                                    critic_shardings=pinned(self.state.critic, self.state.critic_opt, self.critic_mesh),
                                    policy_mesh=self.mesh, critic_mesh=self.critic_mesh)

    # ------------------------------------------------------------------ data
    def _datasets(self, train_dataset, eval_dataset) -> tuple[PPODataset, PPODataset]:
        """(train, eval) PPODatasets; prompts read from files keep their 'file:line' sources."""
        d = self.config.data

        def as_dataset(x):
            return x if isinstance(x, PPODataset) else PPODataset(list(x))

        if train_dataset is None:
            if d.prompts:
                prompts = PPODataset.from_file(d.prompts, field=d.prompt_field)
            elif self.config.reward.task:
                prompts = PPODataset(tasks.get_task(self.config.reward.task).prompts())
            else:
                raise ConfigError("data.prompts is not set and reward.task is null: no prompts to train on",
                                  keys=("data.prompts",))
            if eval_dataset is None and d.eval_prompts:
                eval_dataset = PPODataset.from_file(d.eval_prompts, field=d.prompt_field)
            if eval_dataset is None and d.eval_fraction > 0:
                train_dataset, eval_dataset = split_prompts(prompts, d.eval_fraction, self.config.train.seed)
            else:
                train_dataset = prompts
        elif eval_dataset is None and d.eval_prompts:
            eval_dataset = PPODataset.from_file(d.eval_prompts, field=d.prompt_field)
        return as_dataset(train_dataset), as_dataset(eval_dataset if eval_dataset is not None else [])


def _check_same_vocab(tok_a, tok_b, path_a, path_b):
    """The reward model and critic read the policy's token ids unchanged: vocabularies must agree."""
    if len(tok_a) != len(tok_b) or tok_a.get_vocab() != tok_b.get_vocab():
        raise ConfigError(f"tokenizer mismatch: {path_b} has a different vocabulary ({len(tok_b)} tokens) from the "
                          f"policy {path_a} ({len(tok_a)} tokens); the models must share one tokenizer")
