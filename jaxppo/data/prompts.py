"""Prompts: loading, train/eval split, tokenization (left padding) and a resumable shuffled iterator.

    prompts = load_prompts("prompts.jsonl")                    # JSONL {"prompt": ...} or plain text
    train, evals = split_prompts(prompts, eval_fraction=0.1, seed=0)
    ids, mask = tokenize_prompts(train, tokenizer, max_length=64)   # np.int32 [N, L], left-padded
    it = PromptIterator(len(train), batch_size=16, seed=0)      # endless; next(it) -> indices [16]

`PPODataset` (jaxppo.data.dataset) holds prompts (strings or chat messages) and their columns;
`PPODataset.from_file` keeps the file line of every prompt, so errors found later (a prompt too
long for the context) can name `prompts.jsonl:7`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxppo.data.dataset import PPODataset, Prompt, check_messages
from jaxppo.data.tasks import get_task
from jaxppo.errors import ConfigError, DataError, one_line

__all__ = ["load_prompts", "load_prompt_records", "split_prompts", "PPODataset", "tokenize_prompts", "pad_prompts",
           "PromptIterator", "run_datasets"]


def load_prompt_records(path: str | os.PathLike, field: str = "prompt",
                        columns: Sequence[str] | None = None) -> list[tuple[Prompt, str]]:
    """(prompt, location) for every row of a file or folder, after the checks `PPODataset.from_file`
    makes (fields, columns, chat messages); locations are 'file:LINE' or 'file[ROW]'."""
    dataset = PPODataset.from_file(path, field=field, columns=columns)
    return list(zip(dataset.prompts, dataset.sources or ()))


def load_prompts(path: str | os.PathLike, field: str = "prompt") -> list[Prompt]:
    """Prompts from a file, in file order.

    `.jsonl` files (or files whose first non-blank line is a JSON object) hold one JSON object per
    line with the prompt in `field`; `.json` a list of such objects; `.parquet` a table; a folder
    what `datasets` reads; anything else is plain text, one prompt per non-empty line. A prompt is
    a string or a list of chat messages. Raises DataError naming the file and line on a bad row.
    """
    return PPODataset.from_file(path, field=field, columns=[]).prompts   # the prompts only: no column checks


def split_prompts(prompts: Sequence[Prompt] | PPODataset, eval_fraction: float, seed: int) -> tuple[Any, Any]:
    """Deterministic random split -> (train, eval), each in the original order.

    The eval part has round(n * eval_fraction) prompts, at least 1 when eval_fraction > 0; the
    train part must keep at least one. A PPODataset gives PPODatasets (columns and sources kept), else lists.
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


def tokenize_prompts(prompts: Sequence[Prompt], tokenizer: Any, max_length: int, truncation: str = "left",
                     use_chat_template: bool = False,
                     source: str | Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, LEFT-padded to the longest prompt: np.int32 [N, L], L <= max_length.

    A prompt is a string or a list of chat messages; messages are rendered by the tokenizer's chat
    template (`apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`), and so
    is a string as one user turn when `use_chat_template` is on.
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

    templated = [i for i, p in enumerate(prompts) if use_chat_template or not isinstance(p, str)]
    if templated and not getattr(tokenizer, "chat_template", None):
        i = templated[0]
        reason = ("data.use_chat_template is on" if isinstance(prompts[i], str)
                  else f"{_where(i, source)} is a list of chat messages")
        raise DataError(f"{reason} but the tokenizer has no chat_template")
    texts: list[str] = [p if isinstance(p, str) else "" for p in prompts]
    for i in templated:
        messages = prompts[i]
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        else:
            check_messages(messages, _where(i, source))
        try:
            texts[i] = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except ImportError as e:  # transformers renders templates with jinja2, an optional dependency
            raise DataError(f"the chat template cannot be rendered: {e}") from None
        except Exception as e:  # noqa: BLE001 - a template error (raise_exception, a bad variable)
            raise DataError(f"{_where(i, source)}: the chat template failed ({type(e).__name__}: {one_line(e)})") from None
    # a template already wrote the BOS it wants: no special tokens on top of it
    encoded: list[list[int]] = [[] for _ in prompts]
    chat = set(templated)
    plain = [i for i in range(len(prompts)) if i not in chat]
    for group, add_special_tokens in ((plain, True), (templated, False)):
        if group:
            out = tokenizer([texts[i] for i in group], add_special_tokens=add_special_tokens, padding=False,
                            truncation=False, verbose=False)["input_ids"]
            for i, ids in zip(group, out):
                encoded[i] = ids

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


def run_datasets(config, train_dataset, eval_dataset,
                 columns: Sequence[str] | None = None) -> tuple[PPODataset, PPODataset]:
    """(train, eval) PPODatasets from the arguments or `data.*` (rows read from files keep their
    'file:line' sources); `columns`: the column names to keep (None = all, e.g. `data.columns`).
    Datasets given as PPODatasets are used as they are. ConfigError: train.eval_every > 0 without
    eval prompts."""
    d = config.data

    def as_dataset(x):
        return x if isinstance(x, PPODataset) else PPODataset(x, field=d.prompt_field, columns=columns)

    def from_file(path):
        return PPODataset.from_file(path, field=d.prompt_field, columns=columns)

    if train_dataset is None:
        if d.prompts:
            prompts = from_file(d.prompts)
        elif config.reward.task:
            prompts = PPODataset(get_task(config.reward.task).prompts(), columns=columns)
        else:
            raise ConfigError("data.prompts is not set and reward.task is null: no prompts to train on",
                              keys=("data.prompts",))
        if eval_dataset is None and d.eval_prompts:
            eval_dataset = from_file(d.eval_prompts)
        if eval_dataset is None and d.eval_fraction > 0:
            train_dataset, eval_dataset = split_prompts(prompts, d.eval_fraction, config.train.seed)
        else:
            train_dataset = prompts
    elif eval_dataset is None and d.eval_prompts:
        eval_dataset = from_file(d.eval_prompts)
    train, evals = as_dataset(train_dataset), as_dataset(eval_dataset if eval_dataset is not None else [])
    if config.train.eval_every and not len(evals):      # it would silently never evaluate
        raise ConfigError(f"train.eval_every={config.train.eval_every} but there are no eval prompts (data.eval_prompts "
                          f"is null, data.eval_fraction={d.eval_fraction}, no eval dataset given): set one of them, "
                          f"or train.eval_every=0", keys=("train.eval_every", "data.eval_fraction"))
    return train, evals
