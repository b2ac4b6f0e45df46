"""Model fields given as Hub ids (`org/name[@revision]`), resolved through a Hugging Face cache
folder built here (the layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/}):
the cache is read with no network, the tokenizer comes from the same snapshot, and an id that is
neither cached nor downloadable is one line that says so."""

import shutil

import pytest

from jaxppo.config import load_config
from jaxppo.models.hf import ModelLoadError
from jaxppo.models.hub import is_hub_id, resolve_model
from jaxppo.run.models import load_models, tiny_model_dir
from jaxppo.train import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache, repo: str, source: str, commit: str = COMMIT, ref: str = "main"):
    """Put the files of the folder `source` into `cache` as huggingface_hub stores `repo` at `commit`."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    if not snapshot.exists():
        shutil.copytree(source, snapshot)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return str(snapshot)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp, offline: nothing here may reach the network."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("value, expected", [
    ("Qwen/Qwen2.5-0.5B-Instruct", True), ("meta-llama/Llama-3.2-1B@main", True), ("org/name@0123abc", True),
    ("tiny", False), ("/ckpt/my-llama", False), ("runs/llama/final_model", False), ("./org/name", False),
    ("../org/name", False), ("org/", False), ("org/name@", False),
])
def test_what_reads_as_a_hub_id(value, expected):
    assert is_hub_id(value) is expected


def test_folders_and_non_ids_pass_through(tmp_path, hub_cache):
    folder = tmp_path / "org" / "name"        # a relative folder that reads like an id: the folder wins
    folder.mkdir(parents=True)
    cache_model(hub_cache, "org/name", tiny_model_dir("gpt2"))
    assert resolve_model(str(folder), "model.policy") == str(folder)
    assert resolve_model("/no/such/folder", "model.policy") == "/no/such/folder"   # the loader names it


def test_cached_id_resolves_offline_at_a_ref_or_revision(hub_cache):
    src = tiny_model_dir("gpt2")
    snapshot = cache_model(hub_cache, "test-org/tiny-gpt2", src)
    assert resolve_model("test-org/tiny-gpt2", "model.policy") == snapshot
    assert resolve_model(f"test-org/tiny-gpt2@{COMMIT}", "model.policy") == snapshot
    other = cache_model(hub_cache, "test-org/tiny-gpt2", src, commit="f" * 40, ref="v1")
    assert resolve_model("test-org/tiny-gpt2@v1", "model.policy") == other


def test_load_models_by_id_policy_reward_model_critic_and_tokenizer(hub_cache):
    policy = cache_model(hub_cache, "test-org/tiny-gpt2", tiny_model_dir("gpt2"))
    rm = cache_model(hub_cache, "test-org/tiny-gpt2-rm", tiny_model_dir("gpt2", seed=1, reward_model=True))
    config = load_config(None, ["model.policy=test-org/tiny-gpt2", "model.reward_model=test-org/tiny-gpt2-rm",
                                "model.critic=test-org/tiny-gpt2-rm"])
    models, init = load_models(config)
    assert models.policy_path == policy and models.reward_model_path == rm
    assert init.frozen.reward_model is not None and init.critic is not None
    assert models.tokenizer.name_or_path == policy         # the tokenizer comes from the same snapshot
    assert models.tokenizer("a e i").input_ids


def test_not_cached_and_offline_is_one_line(hub_cache):
    with pytest.raises(ModelLoadError) as e:
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct@main", "model.reward_model")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model.reward_model=Qwen/Qwen2.5-0.5B-Instruct@main is not a folder and not in the "
                          f"Hugging Face cache (HF_HUB_CACHE={hub_cache})")
    assert "HF_HUB_OFFLINE is set" in msg
    assert "`hf download Qwen/Qwen2.5-0.5B-Instruct --revision main`" in msg


def test_not_cached_and_unreachable_hub_is_one_line(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")     # nothing listens: refused at once
    with pytest.raises(ModelLoadError) as e:
        resolve_model("test-org/not-cached", "model.critic")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model.critic=test-org/not-cached is not a folder and not in the Hugging Face cache")
    assert "downloading it failed" in msg and "`hf download test-org/not-cached`" in msg


def test_cli_names_the_field_and_the_fix(hub_cache, tmp_path, capsys):
    code = main(["model.policy=Qwen/Qwen2.5-0.5B-Instruct", f"train.output_dir={tmp_path / 'run'}",
                 "logging.progress_bar=false"])
    _, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.policy=Qwen/Qwen2.5-0.5B-Instruct is not a folder")
    assert "hf download Qwen/Qwen2.5-0.5B-Instruct" in lines[0]
    assert not (tmp_path / "run").exists()
