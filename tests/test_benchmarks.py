"""The benchmark scripts of experiments/ run end to end on tiny models (so they do not rot), and
their FLOP count is the one their docstrings describe."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from jaxppo.run.models import tiny_model_dir

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """policy/ + reward/ and no value/ or prompts.jsonl: the layout `gpu_bench.sh` writes."""
    root = tmp_path_factory.mktemp("bench-models")
    os.symlink(tiny_model_dir("gpt2"), root / "policy")
    os.symlink(tiny_model_dir("gpt2", reward_model=True), root / "reward")
    return str(root)


def _json_line(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


@pytest.mark.slow
def test_bench_ppo_runs_on_random_prompts_and_counts_matmul_flops(model_dir, capsys):
    bench = _load("bench_ppo")
    bench.main(["--model-dir", model_dir, "--batch", "4", "--prompt-len", "8", "--response-length", "8",
                "--ppo-epochs", "1", "--num-mini-batches", "2", "--iters", "2", "--warmup", "1",
                "--logits-chunk-mb", "1"])
    out = _json_line(capsys)
    assert out["prompts"] == "synthetic" and out["backend"] == "cpu" and out["logits_chunk_mb"] == 1
    assert out["minor_page_faults_per_iter_median"] >= 0 and out["sys_cpu_sec_per_iter_median"] >= 0
    assert len(out["sec_per_iter_all"]) == 2 and out["sec_per_iter_median"] > 0
    assert set(out["phase_median_sec"]) == {"rollout", "generate", "scoring_forwards", "update"}
    assert 0 < out["mfu"] and 0 < out["update_mfu"]
    assert out["decode_roofline_tokens_per_sec"] is None       # no DRAM roofline on the CPU
    # the tiny GPT-2: vocab 512 x 64 embedding (tied: it is the LM head), 256 x 64 learned positions
    table, positions = 512 * 64, 256 * 64
    m_policy, m_critic, m_rm = out["matmul_params"]
    assert m_policy == out["policy_params"] - positions
    assert m_critic == out["critic_params"] - table - positions == m_rm
    S, B = 16, 4
    # the policy, reference and critic run P+R-1 tokens (the last one predicts nothing), the RM all
    assert out["model_flops_per_iter"] == (2 * m_policy * B * (S - 1) + 2 * (m_policy + m_critic) * B * (S - 1)
                                           + 2 * m_rm * B * S + 6 * (m_policy + m_critic) * B * (S - 1))


@pytest.mark.slow
def test_bench_rollout_runs_in_bfloat16_without_a_prompt_file(model_dir, capsys):
    bench = _load("bench_rollout")
    bench.main(["--model-dir", model_dir, "--batch", "4", "--prompt-len", "8", "--new-tokens", "8",
                "--iters", "2", "--dtype", "bfloat16"])
    out = _json_line(capsys)
    assert out["dtype"] == "bfloat16" and out["tokens_per_sec"] > 0 and out["iters"] == 2


@pytest.mark.slow
def test_bench_grpo_prints_the_trl_peers_keys(tmp_path, capsys):
    """bench_grpo.py on the tiny policy with a prompts.jsonl: one warm-up + one timed GRPO
    iteration, and the JSON keys the TRL GRPO peer's README asks for (item 11) plus the phases."""
    os.symlink(tiny_model_dir("gpt2"), tmp_path / "policy")
    texts = ["Once upon a time, my neighbour who repairs a cup of tea",
             "Write a short poem about the city council who finds the winter market",
             "Once upon a time, the young engineer who writes about the long letter",
             "Tell me about the quiet garden behind the old library"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts * 2))
    bench = _load("bench_grpo")
    bench.main(["--model-dir", str(tmp_path), "--prompts-per-step", "2", "--num-generations", "2",
                "--prompt-len", "6", "--completion-length", "4", "--iters", "1", "--warmup", "1"])
    out = _json_line(capsys)
    for key in ("impl", "prompts_per_step", "num_generations", "completion_length", "prompt_len",
                "num_iterations_mu", "steps_per_generation", "iters", "sec_per_iter_median",
                "generated_tokens_per_sec", "peak_rss_mb", "reward_mean_per_iter"):
        assert key in out, key
    assert out["impl"] == "jaxppo" and out["prompts"] == "prompts.jsonl" and out["prompts_available"] == 8
    assert (out["prompts_per_step"], out["num_generations"], out["prompt_len"], out["completion_length"]) == (2, 2, 6, 4)
    assert out["sec_per_iter_median"] > 0 and out["generated_tokens_per_sec"] == pytest.approx(
        2 * 2 * 4 / out["sec_per_iter_median"], rel=1e-2)
    assert set(out["phase_median_sec"]) == {"rollout", "reward", "update"}
    assert len(out["reward_mean_per_iter"]) == 2 and all(0 <= r <= 1 for r in out["reward_mean_per_iter"])


@pytest.mark.slow
def test_bench_packing_times_padded_and_packed_updates(capsys):
    bench = _load("bench_packing")
    out = bench.main(["--batch", "4", "--prompt-len", "4", "--response-length", "12", "--hidden", "64", "--layers", "1",
                      "--vocab", "256", "--eos-prob", "0,0.3", "--max-tokens", "16", "--iters", "1"])
    assert _json_line(capsys) == out and out["backend"] == "cpu" and out["max_tokens_per_microbatch"] == 16
    full, short = out["points"]
    assert full["response_fraction"] == 1.0 and short["real_token_fraction"] < full["real_token_fraction"]
    for point in out["points"]:
        assert point["padded_sec"] > 0 and point["packed_sec"] > 0 and point["packed_over_padded_cpu"] > 0
