"""Settings that would silently never act are refused: an `early_stopping.metric` that is not a
metric of the run, an `eval/` metric without evaluations, `train.eval_every` without eval prompts."""

import pytest

from jaxppo.config import EarlyStoppingConfig, load_config
from jaxppo.data.prompts import run_datasets
from jaxppo.errors import ConfigError
from jaxppo.run.early_stopping import EarlyStopping
from jaxppo.run.evaluation import EVAL_METRICS

METRICS = {"objective/scores": 0.5, "objective/kl": 0.1, "objective/rlhf_reward": 0.4, "lr": 1e-3}


def one_line_error(fn, *match):
    with pytest.raises(ConfigError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and all(m in message for m in match), message
    assert info.value.keys[0] == "early_stopping.metric" or "train.eval_every" in info.value.keys
    return message


def test_a_train_metric_typo_is_named_with_close_matches_at_the_first_check():
    es = EarlyStopping(EarlyStoppingConfig(metric="objective/score"))
    one_line_error(lambda: es.value(METRICS, {}, step=1, eval_every=0),
                   "early_stopping.metric='objective/score'", "objective/scores")
    ok = EarlyStopping(EarlyStoppingConfig(metric="objective/kl", mode="min"))
    assert ok.value(METRICS, {}, step=1, eval_every=0) == 0.1


def test_an_eval_metric_typo_is_refused_at_start():
    one_line_error(lambda: EarlyStopping(EarlyStoppingConfig(metric="eval/score")),
                   "early_stopping.metric='eval/score'", "eval/objective/scores")
    for name in EVAL_METRICS:
        EarlyStopping(EarlyStoppingConfig(metric=f"eval/{name}"))


def test_an_eval_metric_needs_evaluations():
    one_line_error(lambda: load_config(None, ["early_stopping.metric=eval/objective/scores"]),
                   "train.eval_every")
    config = load_config(None, ["early_stopping.metric=eval/objective/scores", "train.eval_every=2"])
    assert config.early_stopping.metric == "eval/objective/scores"


def test_eval_every_without_eval_prompts_is_refused_at_start(tmp_path):
    from jaxppo.run.trainer import PPOTrainer

    config = load_config(None, ["train.eval_every=2", "data.eval_fraction=0", "logging.progress_bar=false",
                                "logging.tensorboard=false", f"train.output_dir={tmp_path / 'run'}"])
    trainer = PPOTrainer(config)
    message = one_line_error(trainer.train, "train.eval_every=2", "data.eval_fraction", "data.eval_prompts")
    assert not (tmp_path / "run").exists(), message          # refused before the run directory is touched
    assert set(trainer.evaluate(["Tell me a story"], log=False)) == set(EVAL_METRICS)    # what eval/ may name
    _, evals = run_datasets(config, None, ["an eval prompt given in Python"])             # is enough
    assert len(evals) == 1
