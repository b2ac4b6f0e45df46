"""Model fields given as Hugging Face Hub ids: `org/name` or `org/name@revision` -> a local folder.

    resolve_model("Qwen/Qwen2.5-0.5B-Instruct", "model.policy")   # -> .../snapshots/<commit>
    resolve_model("/ckpt/my-llama", "model.policy")               # a folder (or anything else): unchanged

An existing folder always wins. A value that is not one and looks like a Hub id is looked up in
the local Hugging Face cache first (`HF_HUB_CACHE`, else `HF_HOME/hub`, read at the call, so a
notebook that sets them after importing transformers is followed); when it is not cached it is
downloaded, unless `HF_HUB_OFFLINE` is set. Only the files a jaxppo model needs are fetched
(config and tokenizer files, safetensors weights), never PyTorch `.bin` weights. Every failure is
one `ModelLoadError` line naming the field, the id and the cache, with the command that fixes it.
"""

from __future__ import annotations

import os
import re

from jaxppo.errors import one_line
from jaxppo.models.hf_config import ModelLoadError

__all__ = ["HUB_FILES", "hub_cache_dir", "is_hub_id", "resolve_model"]

# what load_model / load_tokenizer read: config.json, generation_config.json, tokenizer.json,
# tokenizer_config.json, special_tokens_map.json, vocab.json (*.json); merges.txt (GPT-2 BPE);
# tokenizer.model (SentencePiece); model.safetensors or the shards and their index
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "tokenizer.model"]

# the Hub's repo names: letters, digits, "-", "_", "."; one "/" between owner and name
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def is_hub_id(value: str) -> bool:
    """`org/name` or `org/name@revision` (a relative path of two parts reads the same: a folder wins)."""
    return bool(_HUB_ID.match(value)) and ".." not in value


def hub_cache_dir() -> str:
    """The Hugging Face cache: `HF_HUB_CACHE`, else `HF_HOME`/hub, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def offline() -> bool:
    """HF_HUB_OFFLINE set (1/true/yes/on), read at the call."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(value: str, field: str) -> str:
    """The folder `value` names: itself when it is a folder or not a Hub id (the loaders then say
    what is missing), else the snapshot of the id in the Hugging Face cache, downloaded first when
    it is not cached and `HF_HUB_OFFLINE` is unset. ModelLoadError (one line) when neither works."""
    if os.path.isdir(value) or not is_hub_id(value):
        return value
    from huggingface_hub import snapshot_download

    match = _HUB_ID.match(value)
    repo, revision = match["repo"], match["revision"]
    cache = hub_cache_dir()
    try:
        return snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=HUB_FILES,
                                 local_files_only=True)
    except Exception as e:  # noqa: BLE001 - not cached (or cached incompletely): try the Hub below
        cache_error = e
    fix = (f"download it with `hf download {repo}{f' --revision {revision}' if revision else ''}` "
           f"or pass a folder")
    where = f"{field}={value} is not a folder and not in the Hugging Face cache (HF_HUB_CACHE={cache})"
    if offline():
        raise ModelLoadError(f"{where}, and HF_HUB_OFFLINE is set: {fix}") from cache_error
    try:
        return snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=HUB_FILES)
    except Exception as e:  # noqa: BLE001 - network, unknown repo, gated repo, disk: one line
        raise ModelLoadError(f"{where}, and downloading it failed ({type(e).__name__}: {one_line(e, 200)}): "
                             f"{fix}") from None
