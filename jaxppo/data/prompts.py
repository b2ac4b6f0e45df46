"""Prompts: loading, train/eval split, tokenization (left padding) and a resumable shuffled iterator.

    prompts = load_prompts("prompts.jsonl")                    # JSONL {"prompt": ...} or plain text
    train, evals = split_prompts(prompts, eval_fraction=0.1, seed=0)
    ids, mask = tokenize_prompts(train, tokenizer, max_length=64)   # np.int32 [N, L], left-padded
    it = PromptIterator(len(train), batch_size=16, seed=0)      # endless; next(it) -> indices [16]

`PPODataset.from_file` keeps the file line of every prompt, so errors found later (a prompt too
long for the context) can name `prompts.jsonl:7`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np

from jaxppo.data.tasks import get_task
from jaxppo.errors import ConfigError, DataError

__all__ = ["load_prompts", "load_prompt_records", "split_prompts", "PPODataset", "tokenize_prompts", "PromptIterator"]


def _read_text(path: str | os.PathLike) -> str:
    name = os.fspath(path)
    if not os.path.exists(name):
        raise DataError(f"prompt file not found: {name}")
    if os.path.isdir(name):
        raise DataError(f"prompt file is a directory: {name}")
    try:
        with open(name, encoding="utf-8-sig") as fh:  # -sig: a BOM is not part of the first prompt
            return fh.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read prompt file {name}: {e.strerror}") from None


def _is_json_object(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def load_prompt_records(path: str | os.PathLike, field: str = "prompt") -> list[tuple[str, int]]:
    """(prompt, line number) for every prompt of a file; see `load_prompts` for the formats."""
    name = os.fspath(path)
    text = _read_text(name)
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    is_jsonl = name.endswith(".jsonl") or _is_json_object(first)
    records: list[tuple[str, int]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not is_jsonl:
            records.append((line, lineno))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}:{lineno}: expected a JSON object with a {field!r} field, got {type(obj).__name__}")
        if field not in obj:
            keys = ", ".join(repr(k) for k in obj) or "none"
            raise DataError(f"{name}:{lineno}: missing field {field!r} (keys present: {keys})")
        prompt = obj[field]
        if not isinstance(prompt, str):
            raise DataError(f"{name}:{lineno}: field {field!r} must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise DataError(f"{name}:{lineno}: field {field!r} is empty")
        records.append((prompt, lineno))
    if not records:
        raise DataError(f"{name}: no prompts found (the file is empty)")
    return records


def load_prompts(path: str | os.PathLike, field: str = "prompt") -> list[str]:
    """Prompts from a file, in file order.

    `.jsonl` files (or files whose first non-blank line is a JSON object) hold one JSON object per
    line with the prompt in `field`; anything else is plain text, one prompt per non-empty line.
    Blank lines are skipped. Raises DataError naming the file and line on any malformed line.
    """
    return [prompt for prompt, _ in load_prompt_records(path, field)]


class PPODataset:
    """A list of prompt strings, with an optional location per prompt (e.g. 'prompts.jsonl:7')."""

    def __init__(self, prompts: Sequence[str], sources: Sequence[str] | None = None):
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise DataError(f"PPODataset: prompt {i} is a {type(p).__name__}, expected str")
        if sources is not None and len(sources) != len(prompts):
            raise ValueError(f"PPODataset: {len(sources)} sources for {len(prompts)} prompts")
        self.prompts: list[str] = prompts
        self.sources: list[str] | None = list(sources) if sources is not None else None

    @classmethod
    def from_file(cls, path: str | os.PathLike, field: str = "prompt") -> PPODataset:
        records = load_prompt_records(path, field)
        return cls([p for p, _ in records], [f"{os.fspath(path)}:{line}" for _, line in records])

    def __len__(self) -> int:
        return len(self.prompts)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> PPODataset: ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return PPODataset(self.prompts[index], self.sources[index] if self.sources is not None else None)
        return self.prompts[index]

    def select(self, indices: Sequence[int]) -> PPODataset:
        """The prompts at `indices` (with their sources)."""
        return PPODataset([self.prompts[i] for i in indices],
                          [self.sources[i] for i in indices] if self.sources is not None else None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    def __repr__(self) -> str:
        return f"PPODataset({len(self)} prompts)"


def split_prompts(prompts: Sequence[str] | PPODataset, eval_fraction: float, seed: int) -> tuple[Any, Any]:
    """Deterministic random split -> (train, eval), each in the original order.

    The eval part has round(n * eval_fraction) prompts, at least 1 when eval_fraction > 0; the
    train part must keep at least one. A PPODataset gives PPODatasets (sources kept), else lists.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    n = len(prompts)
    n_eval = 0 if eval_fraction == 0 else max(1, round(n * eval_fraction))
    if n - n_eval < 1:
        raise DataError(f"{n} prompt(s) cannot be split with data.eval_fraction={eval_fraction}: "
                        "no training prompt would remain")
    perm = np.random.default_rng(seed).permutation(n)
    eval_idx, train_idx = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
    if isinstance(prompts, PPODataset):
        return prompts.select(train_idx.tolist()), prompts.select(eval_idx.tolist())
    return [prompts[i] for i in train_idx], [prompts[i] for i in eval_idx]


def _where(i: int, source: str | Sequence[str] | None) -> str:
    if source is None:
        return f"prompt {i}"
    if isinstance(source, str):
        return f"{source}: prompt {i}"
    return f"{source[i]} (prompt {i})"


def pad_prompts(ids: np.ndarray, mask: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad `[N, L]` prompt ids and mask to `length >= L` columns, so that train and eval
    prompts share one compiled program."""
    n = ids.shape[1]
    if n > length:   # `tokenize_prompts` pads to the longest prompt: a leading column is never all padding
        raise ValueError(f"prompts of {n} tokens cannot be padded to {length} columns")
    if n == length:
        return ids, mask
    pad = length - n
    return (np.concatenate([np.full((ids.shape[0], pad), pad_id, ids.dtype), ids], axis=1),
            np.concatenate([np.zeros((mask.shape[0], pad), mask.dtype), mask], axis=1))


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any, max_length: int, truncation: str = "left",
                     use_chat_template: bool = False,
                     source: str | Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, LEFT-padded to the longest prompt: np.int32 [N, L], L <= max_length.

    Left padding puts every prompt's last token in the last column, where generation starts.
    Special tokens (BOS) are added only if the tokenizer adds them itself; with a chat template the
    template decides. Prompts longer than `max_length`: truncation="left" keeps the last tokens
    (and a leading BOS) with one warning for all of them; "error" raises DataError naming the
    prompt (`source`: a file name, or one location per prompt such as 'prompts.jsonl:7').
    """
    if truncation not in ("left", "error"):
        raise ValueError(f"truncation={truncation!r}: expected 'left' or 'error'")
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be >= 1")
    prompts = list(prompts)
    if not prompts:
        raise DataError("no prompts to tokenize")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad token nor an EOS token to pad prompts with")

    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.use_chat_template is on but the tokenizer has no chat_template")
        try:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=False) for p in prompts]
        except ImportError as e:  # transformers renders templates with jinja2, an optional dependency
            raise DataError(f"data.use_chat_template is on but the template cannot be rendered: {e}") from None
        add_special_tokens = False  # the template already wrote the BOS it wants
    else:
        texts, add_special_tokens = prompts, True
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, padding=False, truncation=False,
                        verbose=False)["input_ids"]

    bos = getattr(tokenizer, "bos_token_id", None)
    rows: list[list[int]] = []
    n_truncated = 0
    for i, ids in enumerate(encoded):
        ids = list(ids)
        if not ids:
            raise DataError(f"{_where(i, source)}: the prompt is empty after tokenization")
        if len(ids) > max_length:
            if truncation == "error":
                raise DataError(f"{_where(i, source)}: the prompt has {len(ids)} tokens, more than "
                                f"data.max_prompt_length={max_length} (data.truncation=left keeps the last tokens)")
            if not n_truncated:
                first_truncated = f"{_where(i, source)}, {len(ids)} tokens"
            n_truncated += 1
            keep_bos = bos is not None and ids[0] == bos and max_length > 1
            ids = ([bos] if keep_bos else []) + ids[len(ids) - (max_length - keep_bos):]
        rows.append(ids)
    if n_truncated:
        warnings.warn(f"{n_truncated} of {len(rows)} prompts were longer than data.max_prompt_length={max_length} "
                      f"tokens and were truncated on the left (first: {first_truncated}; "
                      "data.truncation=error stops instead)", stacklevel=2)

    length = max(len(r) for r in rows)
    input_ids = np.full((len(rows), length), pad_id, dtype=np.int32)  # [N, L]
    attention_mask = np.zeros((len(rows), length), dtype=np.int32)  # [N, L]
    for i, ids in enumerate(rows):
        input_ids[i, length - len(ids):] = ids
        attention_mask[i, length - len(ids):] = 1
    return input_ids, attention_mask


class PromptIterator:
    """Endless, epoch-wise shuffled batches of prompt indices, resumable.

    Epoch e visits the prompts in the order `np.random.default_rng([seed, e]).permutation(n)`
    (arange(n) without shuffle) and yields `n // batch_size` batches of `batch_size` indices;
    the incomplete tail is dropped. When n < batch_size, epochs are concatenated instead (a batch
    then spans epochs and may repeat a prompt), so a tiny prompt set still trains.

    `state_dict()` -> {"epoch", "position"}; after `load_state_dict` the batches continue exactly
    as an uninterrupted iterator would.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int, shuffle: bool = True):
        if num_prompts < 1:
            raise DataError("no prompts to iterate over")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.num_prompts, self.batch_size, self.seed, self.shuffle = num_prompts, batch_size, seed, shuffle
        self._epoch, self._position = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        """Complete batches per epoch (0 when num_prompts < batch_size: batches then span epochs)."""
        return self.num_prompts // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = self.num_prompts
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> PromptIterator:
        return self

    def __next__(self) -> np.ndarray:
        n, b = self.num_prompts, self.batch_size
        if n >= b and self._position + b > n:  # drop the incomplete tail of the epoch
            self._epoch, self._position = self._epoch + 1, 0
        parts, need = [], b
        while need:
            take = self._order(self._epoch)[self._position:self._position + need]
            parts.append(take)
            need -= len(take)
            self._position += len(take)
            if self._position == n:
                self._epoch, self._position = self._epoch + 1, 0
        return np.concatenate(parts).astype(np.int64)  # [batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self._epoch), "position": int(self._position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"invalid prompt iterator state {state!r}: expected {{'epoch': int, 'position': int}}") from None
        if epoch < 0 or not 0 <= position <= self.num_prompts:
            raise DataError(f"prompt iterator state {state!r} does not fit {self.num_prompts} prompts "
                            "(did the prompt file change since the checkpoint?)")
        self._epoch, self._position = epoch, position


def run_datasets(config, train_dataset, eval_dataset) -> tuple[PPODataset, PPODataset]:
    """(train, eval) PPODatasets from the arguments or `data.*`; prompts read from files keep their
    'file:line' sources."""
    d = config.data

    def as_dataset(x):
        return x if isinstance(x, PPODataset) else PPODataset(list(x))

    if train_dataset is None:
        if d.prompts:
            prompts = PPODataset.from_file(d.prompts, field=d.prompt_field)
        elif config.reward.task:
            prompts = PPODataset(get_task(config.reward.task).prompts())
        else:
            raise ConfigError("data.prompts is not set and reward.task is null: no prompts to train on",
                              keys=("data.prompts",))
        if eval_dataset is None and d.eval_prompts:
            eval_dataset = PPODataset.from_file(d.eval_prompts, field=d.prompt_field)
        if eval_dataset is None and d.eval_fraction > 0:
            train_dataset, eval_dataset = split_prompts(prompts, d.eval_fraction, config.train.seed)
        else:
            train_dataset = prompts
    elif eval_dataset is None and d.eval_prompts:
        eval_dataset = PPODataset.from_file(d.eval_prompts, field=d.prompt_field)
    return as_dataset(train_dataset), as_dataset(eval_dataset if eval_dataset is not None else [])
