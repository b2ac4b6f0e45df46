"""PPOTrainer end to end on a tiny model: the run directory, exact resume, evaluation, early
stopping, non-finite guards, reward-function failures and export."""

import json
import math
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.config import load_config
from jaxppo.engine import programs as iteration
from jaxppo.run.logger import read_metrics
from jaxppo.models.hf import load_causal_lm
from jaxppo.errors import RewardError
from jaxppo.run.trainer import NonFiniteError, PPOTrainer

# small and fast: 4 prompts x 8 tokens, 2 epochs x 2 minibatches
FAST = ["model.tiny_arch=gpt2", "train.batch_size=4", "rollout.max_new_tokens=8", "ppo.epochs=2",
        "ppo.num_minibatches=2", "logging.progress_bar=false", "logging.tensorboard=false",
        "data.max_prompt_length=24", "train.eval_batch_size=4", "optim.lr=1e-3"]

NON_TIME = lambda row: {k: v for k, v in row.items() if not k.startswith("time") and k != "tokens_per_sec"}


def make(tmp_path, *extra, name="run"):
    prompts = tmp_path / "prompts.txt"
    if not prompts.exists():
        from jaxppo.data.tasks import demo_prompts
        prompts.write_text("\n".join(demo_prompts(24, seed=1)) + "\n")
    return load_config(None, FAST + [f"train.output_dir={tmp_path / name}", f"data.prompts={prompts}", *extra])


def constant_reward(prompts, responses):
    return [1.0 for _ in responses]


def test_run_writes_the_run_directory(tmp_path):
    cfg = make(tmp_path, "train.total_steps=4", "train.eval_every=2", "train.save_every=2",
               "logging.tensorboard=true")
    trainer = PPOTrainer(cfg)
    summary = trainer.train()
    # every program compiled once: four iterations and two evaluations, no recompiles
    assert {name: f._cache_size() for name, f in trainer.programs.jitted().items()} == \
        {name: 1 for name in trainer.programs.jitted()}
    run = tmp_path / "run"
    for name in ("config.yaml", "train.log", "metrics.jsonl", "samples.jsonl", "tensorboard", "checkpoints",
                 "plots/overview.png", "final_model/config.json", "final_model/model.safetensors"):
        assert (run / name).exists(), name
    assert load_config(run / "config.yaml") == cfg
    rows = read_metrics(run / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4]
    for key in ("objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
                "objective/non_score_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "lr", "tokens_per_sec"):
        assert all(math.isfinite(r[key]) for r in train), key
    samples = [json.loads(l) for l in open(run / "samples.jsonl")]
    assert samples and set(samples[0]) >= {"step", "prompt", "response", "score"}
    assert summary["steps"] == 4 and "final" not in summary.get("stopped", "") if summary.get("stopped") else True
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())[-1] == 4


def test_export_loads_back_with_same_logits(tmp_path):
    cfg = make(tmp_path, "train.total_steps=1")
    trainer = PPOTrainer(cfg)
    trainer.train()
    model, tok = load_causal_lm(str(tmp_path / "run" / "final_model"))
    from flax import nnx
    trained = nnx.merge(trainer.models.graphs.policy, trainer.state.policy)
    ids = jnp.asarray(tok(["the cat walks"], return_tensors="np")["input_ids"])
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(trained(ids)), atol=1e-5)


def _stop_after(trainer, n_calls):
    """A reward function that asks the trainer to stop (as SIGTERM does) on its n-th call."""
    calls = {"n": 0}

    def reward(prompts, responses):
        calls["n"] += 1
        if calls["n"] == n_calls:
            trainer.signals.received = signal.SIGTERM
        return [float(len(r) % 5) for r in responses]
    return reward


def test_resume_continues_exactly(tmp_path):
    common = ["train.total_steps=4", "train.save_every=10", "reward.task=null", "reward.functions=[]",
              "train.eval_every=0", "data.eval_fraction=0.0", "optim.schedule=cosine", "optim.warmup_steps=2",
              "ppo.adaptive_kl={target: 1.0, horizon: 100}"]

    def reward(prompts, responses):
        return [float(len(r) % 5) for r in responses]

    straight = PPOTrainer(make(tmp_path, *common, name="straight"), reward_functions=[reward])
    straight.train()

    cfg = make(tmp_path, *common, name="resumed")
    first = PPOTrainer(cfg, reward_functions=[reward])
    first.rewards.fns = [("stopper", _stop_after(first, 2), 1.0)]
    out = first.train()
    assert out["stopped"].startswith("received signal") and out["step"] == 2
    second = PPOTrainer(cfg, resume_from_checkpoint="latest", reward_functions=[reward])
    second.train()

    a = [NON_TIME(r) for r in read_metrics(tmp_path / "straight" / "metrics.jsonl", split="train")]
    b = [NON_TIME(r) for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl", split="train")]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra == rb, (ra["step"], {k: (ra[k], rb[k]) for k in ra if ra[k] != rb.get(k)})
    for x, y in zip(jax.tree.leaves(straight.state), jax.tree.leaves(second.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_with_a_different_model_is_refused(tmp_path):
    from jaxppo.errors import ConfigError
    PPOTrainer(make(tmp_path, "train.total_steps=1")).train()
    other = make(tmp_path, "train.total_steps=2", "model.tiny_arch=llama")
    with pytest.raises(ConfigError, match="different model"):
        PPOTrainer(other, resume_from_checkpoint="latest").train()


def test_evaluate_is_deterministic(tmp_path):
    trainer = PPOTrainer(make(tmp_path, "train.total_steps=1"))
    prompts = ["Tell me a story about the cat", "Describe how a wise owl finds a key", "Imagine that"]
    a = trainer.evaluate(prompts, log=False)
    b = trainer.evaluate(prompts, log=False)
    assert a == b
    assert set(a) >= {"objective/scores", "objective/kl", "response_length", "eos_rate"}
    assert a["num_prompts"] == 3.0
    trainer.evaluator.prompt_len = 2                  # train prompts shorter than these: eval ones are never cut
    longer = ["Describe how a wise owl finds a key in the old forest"]
    ids, mask = trainer.evaluator.arrays(longer)
    np.testing.assert_array_equal(ids, trainer.tokenize(longer)[0])


def test_evaluation_program_matches_the_training_rollout(tmp_path):
    """`programs.evaluate` samples what the rollout samples under the same key and scores it the
    same way (KL to the reference, reward model), without the critic; by default one batch holds
    every eval prompt, up to 4 x train.batch_size."""
    from jaxppo.run.models import tiny_model_dir

    rm = tiny_model_dir("gpt2", reward_model=True)
    trainer = PPOTrainer(make(tmp_path, "train.total_steps=1", f"model.reward_model={rm}", "train.eval_batch_size=null"))
    prompts = ["Tell me a story about the cat", "Describe how a wise owl finds a key", "Imagine that",
               "Write about the sea", "Explain the moon", "A poem on rain"]
    ids, mask = trainer.tokenize(prompts)
    key = jax.random.PRNGKey(5)
    exp = iteration.rollout(trainer.programs, trainer.state, trainer.frozen, ids, mask, key)
    out = trainer.programs.evaluate(trainer.state.policy, trainer.frozen, ids, mask, key)
    np.testing.assert_array_equal(out.response, exp.response)
    np.testing.assert_array_equal(out.mask, exp.mask)
    np.testing.assert_allclose(out.kl, ((exp.logprobs - exp.ref_logprobs) * exp.mask).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.rm_scores, exp.rm_scores, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(out.rm_scores)).max() > 0
    assert trainer.evaluator.batch_size(6) == 6 and trainer.evaluator.batch_size(100) == 16
    a = trainer.evaluate(prompts, log=False)
    assert a["num_prompts"] == 6.0


def test_background_evaluation_logs_what_a_blocking_one_does(tmp_path):
    """train.async_eval runs each evaluation while the next step trains; every logged value is
    the same as when the step waits for it (the eval row just comes one step later)."""
    rows = {}
    for flag in ("true", "false"):
        cfg = make(tmp_path, "train.total_steps=4", "train.eval_every=1", f"train.async_eval={flag}", name=flag)
        trainer = PPOTrainer(cfg)
        trainer.train()
        rows[flag] = read_metrics(tmp_path / flag / "metrics.jsonl")
        assert trainer.programs.evaluate._cache_size() == 1
    for split in ("train", "eval"):
        a, b = ([NON_TIME(r) for r in rows[f] if r["split"] == split] for f in ("true", "false"))
        assert sorted(a, key=lambda r: r["step"]) == b and len(b) == 4
    evals = [(i, r["step"]) for i, r in enumerate(rows["true"]) if r["split"] == "eval"]
    train_steps = [r["step"] for r in rows["true"] if r["split"] == "train"]
    assert [s for _, s in evals] == [1, 2, 3, 4] and train_steps == [1, 2, 3, 4]


def test_early_stopping(tmp_path):
    trainer = PPOTrainer(make(tmp_path, "train.total_steps=8", "early_stopping.metric=objective/scores",
                              "early_stopping.mode=max", "early_stopping.patience=1", "early_stopping.min_delta=100"))
    summary = trainer.train()
    assert summary["stopped"] and "early stopping" in summary["stopped"]
    assert summary["steps"] == 2          # step 1 sets the best; step 2 cannot beat it by 100
    assert "early stopping" in (tmp_path / "run" / "train.log").read_text()
    # the unit: patience counts checks without an improvement of more than min_delta (100 here)
    t = trainer
    t.early_stopping.load_state_dict({"best": None, "bad_count": 0})
    assert [t.check_early_stopping(v) for v in (1.0, 50.0, 200.0, 250.0)] == [False, True, False, True]
    assert t.early_stopping.best == 200.0


def test_nonfinite_updates_are_skipped_then_stop(tmp_path):
    def huge(prompts, responses):
        return [3e38 for _ in responses]          # returns overflow in the value loss -> inf

    trainer = PPOTrainer(make(tmp_path, "train.total_steps=5", "train.max_nonfinite_steps=2",
                              "reward.task=null", "reward.functions=[]"), reward_functions=[huge])
    before = jax.tree.map(np.asarray, trainer.state.policy)
    with pytest.raises(NonFiniteError, match="2 consecutive non-finite"):
        trainer.train()
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(trainer.state.policy)):
        np.testing.assert_array_equal(x, np.asarray(y))        # skipped updates left the weights alone
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl", split="train")
    assert [r["nonfinite"] for r in rows] == [1.0, 1.0]


def test_a_diverging_run_stops_without_saving_its_bad_steps(tmp_path):
    """lr=1e38: the first optimizer step of step 1 applies (finite gradients), the model's outputs
    then overflow and the remaining steps are skipped; no checkpoint is written for a step that
    skipped any, so none exists when the run stops after the streak."""
    trainer = PPOTrainer(make(tmp_path, "train.total_steps=6", "train.max_nonfinite_steps=2",
                              "train.save_every=1", "optim.lr=1e38", "optim.schedule=constant"))
    with pytest.raises(NonFiniteError, match="2 consecutive non-finite updates at step 2"):
        trainer.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl", split="train")
    assert [r["nonfinite"] for r in rows] == [1.0, 1.0]
    assert [r["nonfinite_steps"] for r in rows] == [3.0, 4.0]          # 4 optimizer steps per step
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]


def test_reward_function_failures(tmp_path):
    def nan_reward(prompts, responses):
        return [float("nan")] + [0.5] * (len(responses) - 1)

    with pytest.raises(RewardError, match="returned nan for prompt"):
        PPOTrainer(make(tmp_path, "train.total_steps=1", "reward.task=null", "reward.functions=[]"),
                   reward_functions=[nan_reward]).train()
    trainer = PPOTrainer(make(tmp_path, "train.total_steps=1", "reward.task=null", "reward.functions=[]",
                              "reward.on_error=penalty", "reward.error_penalty=-2.0", name="pen"),
                         reward_functions=[nan_reward])
    trainer.train()
    row = read_metrics(tmp_path / "pen" / "metrics.jsonl", split="train")[0]
    np.testing.assert_allclose(row["objective/scores"], (-2.0 + 0.5 * 3) / 4, rtol=1e-6)
    assert "non-finite" in (tmp_path / "pen" / "train.log").read_text()


def test_plateau_schedule_runs_and_reports_lr(tmp_path):
    trainer = PPOTrainer(make(tmp_path, "train.total_steps=3", "optim.schedule=plateau",
                              "optim.plateau.patience=0", "optim.plateau.factor=0.5", "optim.plateau.atol=1e9",
                              "optim.plateau.mode=max"))
    trainer.train()
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", split="train")]
    # atol 1e9: nothing counts as an improvement, so the first decision halves the scale (the row
    # of step k reports the lr that step's update used); it never grows back
    assert lrs[:2] == pytest.approx([1e-3, 5e-4], rel=1e-6)
    assert lrs[2] <= lrs[1]


def test_logits_chunk_mb_reaches_the_update_and_the_scoring_forwards(tmp_path):
    t = PPOTrainer(make(tmp_path, "model.logits_chunk_mb=3"))
    assert t.programs.settings.update.logits_chunk_bytes == 3 * 2**20
    assert PPOTrainer(make(tmp_path)).programs.settings.update.logits_chunk_bytes is None
