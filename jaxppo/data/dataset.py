"""`PPODataset`: prompts, each a string or a list of chat messages, plus the other fields of each
row as columns, which reach the reward functions as keyword arguments (`answer=[...]`).

    PPODataset(["the cat", "a dog"])                              # prompts only
    PPODataset([{"prompt": "2+2=", "answer": "4"}, ...])         # rows: prompt field + columns
    PPODataset({"prompt": [...], "answer": [...]})                # column-wise, as `Dataset.from_dict`
    PPODataset(datasets.load_dataset("gsm8k", "main", split="train"), field="question")
    PPODataset.from_file("train.parquet", columns=["answer"])     # see jaxppo.data.files

`list(dataset)` gives the prompts; `dataset.columns_at(indices)` the columns of a batch.
A chat prompt is `[{"role": "system"|"user"|"assistant", "content": str}, ...]`, rendered by the
tokenizer's chat template (`tokenize_prompts`) and given to reward functions as is (as TRL does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union, overload

from jaxppo.data.files import read_records
from jaxppo.errors import DataError

__all__ = ["PPODataset", "Prompt", "ROLES", "check_messages", "prompt_key"]

Prompt = Union[str, list]      # a string, or a list of {"role", "content"} messages
ROLES = ("system", "user", "assistant")


def check_messages(messages: Any, where: str) -> None:
    """Raise DataError (naming `where`, e.g. 'p.jsonl:3') unless `messages` is a non-empty list of
    {"role": one of ROLES, "content": str} dicts."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: a chat prompt must be a non-empty list of messages, got "
                        f"{'an empty list' if isinstance(messages, list) else type(messages).__name__}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {j} is a {type(m).__name__}, expected "
                            "{'role': ..., 'content': ...}")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: message {j} has role {m.get('role')!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {j} needs a string 'content', got {type(m.get('content')).__name__}")


def prompt_key(prompt: Prompt) -> str:
    """A string that identifies a prompt: the prompt itself, or the JSON of a message list (lists
    cannot be dict keys)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def _as_mapping(rows: Any) -> Mapping[str, list] | None:
    """The columns of a Hugging Face `datasets.Dataset` (duck-typed: `datasets` stays optional) or
    of a column-wise dict; None for a sequence of rows."""
    if isinstance(rows, Mapping):
        splits = [k for k, v in rows.items() if hasattr(v, "column_names")]
        if splits:
            raise DataError(f"a DatasetDict with splits {', '.join(map(str, splits))}: pass one split "
                            f"(e.g. dataset[{splits[0]!r}])")
        return rows
    if hasattr(rows, "column_names") and hasattr(rows, "to_dict"):
        return rows.to_dict()
    return None


def _parse(rows: Any, field: str, columns: Sequence[str] | None,
           sources: Sequence[str] | None) -> tuple[list[Prompt], dict[str, list]]:
    """(prompts, columns) of any accepted input; DataError naming the row on a bad one."""
    if isinstance(rows, (str, bytes)):
        raise DataError(f"PPODataset: expected a list of prompts or rows, got a {type(rows).__name__}")
    if columns is not None and field in columns:
        raise DataError(f"data.columns lists the prompt field {field!r}: the prompts reach reward functions "
                        "as their first argument already")

    def where(i: int) -> str:
        return sources[i] if sources is not None else f"row {i}"

    mapping = _as_mapping(rows)
    if mapping is not None:
        if field not in mapping:
            raise DataError(f"no prompt field {field!r} (columns: {', '.join(map(repr, mapping)) or 'none'}; "
                            "data.prompt_field names it)")
        n = len(mapping[field])
        rows = [{k: v[i] for k, v in mapping.items()} for i in range(n)] if n else []
        names = [k for k in mapping if k != field] if columns is None else list(columns)
    else:
        rows = list(rows)
        names = list(columns or ())
        if columns is None and rows and isinstance(rows[0], dict):
            names = [k for k in rows[0] if k != field]
    if sources is not None and len(sources) != len(rows):
        raise ValueError(f"PPODataset: {len(sources)} sources for {len(rows)} rows")

    prompts: list[Prompt] = []
    cols: dict[str, list] = {k: [] for k in names}
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            if field not in row:
                keys = ", ".join(repr(k) for k in row) or "none"
                raise DataError(f"{where(i)}: missing field {field!r} (keys present: {keys})")
            prompt = row[field]
            if isinstance(prompt, str) and not prompt.strip():
                raise DataError(f"{where(i)}: field {field!r} is empty")
            if not isinstance(prompt, (str, list)):
                raise DataError(f"{where(i)}: field {field!r} must be a string or a list of chat messages, "
                                f"got {type(prompt).__name__}")
            for k in names:
                if k not in row:
                    raise DataError(f"{where(i)}: missing column {k!r} (every row needs the columns "
                                    f"{', '.join(map(repr, names))}; data.columns picks them)")
                cols[k].append(row[k])
            if columns is None and len(row) != len(names) + 1:
                extra = next(k for k in row if k != field and k not in cols)
                raise DataError(f"{where(i)}: column {extra!r} is not in the first row (every row needs the same "
                                "columns; data.columns picks them)")
        elif isinstance(row, (str, list)):
            if names:
                raise DataError(f"{where(i)}: missing column {names[0]!r} (a plain prompt has no columns)")
            prompt = row
        else:
            raise DataError(f"{where(i)}: a prompt must be a string, a list of chat messages or an object "
                            f"with a {field!r} field, got {type(row).__name__}")
        if isinstance(prompt, list):
            check_messages(prompt, where(i))
        prompts.append(prompt)
    return prompts, cols


class PPODataset:
    """Prompts (strings or message lists), their columns, and an optional location per row
    (e.g. 'prompts.jsonl:7').

    rows: a sequence of prompts, a sequence of dicts (the prompt in `field`, every other key a
    column), a column-wise dict, or a Hugging Face `datasets.Dataset`. columns: the names to keep
    (None = all; each row must then have the first row's keys). Raises DataError naming the row.
    """

    def __init__(self, rows: Any = (), sources: Sequence[str] | None = None, *, field: str = "prompt",
                 columns: Sequence[str] | None = None):
        self.prompts, self.columns = _parse(rows, field, columns, sources)   # list[Prompt], dict[str, list]
        self.sources: list[str] | None = list(sources) if sources is not None else None
        self.field = field

    @classmethod
    def from_file(cls, path: str | os.PathLike, field: str = "prompt",
                  columns: Sequence[str] | None = None) -> PPODataset:
        """Rows of a JSONL, JSON, Parquet or plain-text file, or of a `datasets` folder
        (`jaxppo.data.files.read_records`), each with its location."""
        records, sources = read_records(path, field)
        return cls(records, sources, field=field, columns=columns)

    def __len__(self) -> int:
        return len(self.prompts)

    @overload
    def __getitem__(self, index: int) -> Prompt: ...
    @overload
    def __getitem__(self, index: slice) -> PPODataset: ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.select(range(len(self))[index])
        return self.prompts[index]

    def select(self, indices: Sequence[int]) -> PPODataset:
        """The rows at `indices` (with their columns and sources)."""
        indices = [int(i) for i in indices]
        rows = {self.field: [self.prompts[i] for i in indices], **self.columns_at(indices)}
        return PPODataset(rows, [self.sources[i] for i in indices] if self.sources is not None else None,
                          field=self.field)

    def columns_at(self, indices: Sequence[int]) -> dict[str, list]:
        """{name: [value of each row in `indices`]} (a NumPy index array works too)."""
        return {k: [v[int(i)] for i in indices] for k, v in self.columns.items()}

    def source_map(self) -> dict[str, str]:
        """{prompt_key(prompt): location}, for `RewardScorer.sources`; empty without sources."""
        return {prompt_key(p): s for p, s in zip(self.prompts, self.sources or ())}

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def __repr__(self) -> str:
        cols = f", columns {list(self.columns)}" if self.columns else ""
        return f"PPODataset({len(self)} prompts{cols})"
