"""The critic-free family through the trainer: GRPO, RLOO, REINFORCE++(-baseline) train with no
critic anywhere, group sampling, DAPO's dynamic sampling and overlong punishment, a resumed
critic-free run continues exactly."""

import jax
import numpy as np
import pytest

from jaxppo.errors import ConfigError
from jaxppo.run.logger import read_metrics
from jaxppo.run.trainer import PPOTrainer

from test_trainer import NON_TIME
from test_trainer import make as make_ppo


def make(tmp_path, *extra, name="run"):
    """test_trainer's small run, one epoch, two samples per prompt."""
    return make_ppo(tmp_path, "ppo.epochs=1", "rollout.num_generations=2", *extra, name=name)


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_critic_free_estimators_train_without_a_critic(tmp_path, advantage):
    trainer = PPOTrainer(make(tmp_path, f"algo.advantage={advantage}", "train.total_steps=2", "ppo.kl_in=loss",
                              "ppo.kl_coef=0.04"))
    assert trainer.state.critic is None and trainer.state.critic_opt is None
    assert trainer.programs.values is None and trainer.programs.critic_update is None
    assert trainer.models.critic_config is None
    trainer.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl", split="train")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert not any(k.startswith("val/") and k != "val/num_eos_tokens" and k != "val/ratio" for k in r), r
        assert "loss/value_avg" not in r and "lr_critic" not in r
        for k in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "kl", "entropy",
                  "policy/kl_avg", "clip_ratio/low_mean", "clip_ratio/high_mean", "episodes"):
            assert np.isfinite(r[k]), (k, r)
        assert r["episodes"] == r["step"] * 4 * 2           # 4 prompts x 2 samples per iteration
    assert (tmp_path / "run" / "final_model" / "model.safetensors").exists()


def test_group_rows_get_their_prompts_and_columns(tmp_path):
    """The G samples of a prompt are consecutive rows; each reward call sees every prompt G times."""
    seen = []

    def reward(prompts, responses, **columns):
        seen.append(list(prompts))
        return [0.0 for _ in responses]

    t = PPOTrainer(make(tmp_path, "algo.advantage=rloo", "rollout.num_generations=3", "train.batch_size=2",
                        "ppo.num_minibatches=1", "train.total_steps=1", "reward.task=null", "data.eval_fraction=0"),
                   reward_functions=[reward])
    t.train()
    assert len(seen[0]) == 6 and seen[0][0] == seen[0][1] == seen[0][2] and seen[0][3] == seen[0][4] == seen[0][5]


def test_dynamic_sampling_keeps_groups_that_carry_a_signal(tmp_path):
    """algo.filter_groups: a group whose G rewards are equal is dropped and sampling goes on (the
    next prompts, a new key) until the batch is full or max_sample_rounds; the metrics say how."""
    calls = {"n": 0}

    def reward(prompts, responses):       # odd calls: every group flat; even calls: every group spread
        calls["n"] += 1
        return [0.5 if calls["n"] % 2 else float(i % 2) for i, _ in enumerate(responses)]

    t = PPOTrainer(make(tmp_path, "algo.advantage=grpo", "algo.filter_groups=true", "algo.max_sample_rounds=3",
                        "rollout.num_generations=4", "train.total_steps=2", "reward.task=null",
                        "data.eval_fraction=0"), reward_functions=[reward])
    t.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl", split="train")
    for r in rows:      # round 1 all flat (dropped), round 2 all spread (kept): full after two rounds
        assert r["sampling/rounds"] == 2 and r["sampling/groups_with_signal_frac"] == 0.5
        assert r["sampling/filled_without_signal"] == 0 and r["frac_reward_zero_std"] == 0.0
    assert calls["n"] == 4

    calls["n"] = 0
    flat = PPOTrainer(make(tmp_path, "algo.advantage=grpo", "algo.filter_groups=true", "algo.max_sample_rounds=2",
                           "rollout.num_generations=4", "train.total_steps=1", "reward.task=null",
                           "data.eval_fraction=0", name="flat"), reward_functions=[lambda p, r: [0.5] * len(r)])
    flat.train()
    r = read_metrics(tmp_path / "flat" / "metrics.jsonl", split="train")[0]
    assert r["sampling/rounds"] == 2 and r["sampling/filled_without_signal"] == 4 and r["frac_reward_zero_std"] == 1


def test_overlong_punishment_lowers_the_score_of_long_responses(tmp_path):
    """reward.overlong: responses beyond max_length - buffer lose up to `penalty` (DAPO); with no KL
    in the reward and no normalisation the shaped reward is the raw score minus the penalty."""
    common = ["algo.advantage=grpo", "train.total_steps=1", "rollout.stop_at_eos=false", "reward.normalize=false",
              "ppo.kl_in=loss"]
    t = PPOTrainer(make(tmp_path, *common, "reward.overlong={max_length: 6, buffer: 2, penalty: 0.5}"))
    t.train()
    r = read_metrics(tmp_path / "run" / "metrics.jsonl", split="train")[0]
    assert r["completions/mean_length"] == 8                      # every response runs 8 > max_length tokens
    np.testing.assert_allclose(r["objective/rlhf_reward"], r["objective/scores"] - 0.5, rtol=1e-5)


def test_a_resumed_grpo_run_continues_exactly(tmp_path):
    common = ["algo.advantage=grpo", "train.total_steps=3", "train.save_every=10", "train.eval_every=0",
              "data.eval_fraction=0.0", "ppo.kl_in=loss", "ppo.kl_coef=0.04"]
    straight = PPOTrainer(make(tmp_path, *common, name="straight"))
    straight.train()
    cfg = make(tmp_path, *common, name="resumed")
    first = PPOTrainer(cfg)
    calls = {"n": 0}
    real = first.rewards.fns[0][1]

    def stopper(prompts, responses, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            import signal
            first.signals.received = signal.SIGTERM
        return real(prompts, responses, **kw)

    first.rewards.fns = [(first.rewards.fns[0][0], stopper, first.rewards.fns[0][2])]
    assert first.train()["step"] == 2
    second = PPOTrainer(cfg, resume_from_checkpoint="latest")
    second.train()
    a = [NON_TIME(r) for r in read_metrics(tmp_path / "straight" / "metrics.jsonl", split="train")]
    b = [NON_TIME(r) for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl", split="train")]
    assert a == b and len(a) == 3
    for x, y in zip(jax.tree.leaves(straight.state), jax.tree.leaves(second.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("overrides, match", [
    (["algo.advantage=grpo", "rollout.num_generations=1"], "needs rollout.num_generations >= 2"),
    (["algo.filter_groups=true", "rollout.num_generations=1"], "needs rollout.num_generations >= 2"),
    (["algo.advantage=rloo", "train.placement=separate"], "trains no critic"),
    (["ppo.kl_in=loss", "ppo.adaptive_kl={target: 1.0, horizon: 100}"], "ppo.kl_in=loss"),
    (["rollout.num_generations=3", "train.batch_size=5", "ppo.num_minibatches=2"], "5x3 is not divisible"),
    (["algo.loss_agg=mean"], "algo.loss_agg"),
    (["ppo.dual_clip=0.5"], "ppo.dual_clip"),
])
def test_impossible_combinations_are_one_line_config_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        make(tmp_path, *overrides)
    assert "\n" not in str(e.value)
