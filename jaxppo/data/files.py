"""Dataset files -> rows and their locations, with one-line errors that name the file and line.

| path                                   | rows                          | location of row i      |
|----------------------------------------|-------------------------------|------------------------|
| `.jsonl` (or first line a JSON object) | one JSON object per line      | `path:LINE`            |
| `.json`                                | a list of objects, or {"data": [...]} | `path[i]`      |
| `.parquet`                             | the table's rows (pyarrow)    | `path[i]`              |
| a folder from `Dataset.save_to_disk`   | `datasets.load_from_disk`     | `path[i]`              |
| another folder (data files)            | `datasets.load_dataset(path)` | `path[i]`              |
| anything else                          | plain text, one prompt a line | `path:LINE`            |

Parquet needs pyarrow and folders need `datasets`: `pip install 'jaxppo[datasets]'` brings both.
Blank lines of text and JSONL files are skipped.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxppo.errors import DataError

__all__ = ["read_records", "EXTRA_HINT"]

EXTRA_HINT = "pip install 'jaxppo[datasets]'"


def _read_text(name: str) -> str:
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


def _object(obj: Any, where: str, field: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with a {field!r} field, got {type(obj).__name__}")
    return obj


def _jsonl(name: str, lines: list[str], field: str) -> tuple[list, list[str]]:
    rows, sources = [], []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        rows.append(_object(obj, f"{name}:{lineno}", field))
        sources.append(f"{name}:{lineno}")
    return rows, sources


def _json(name: str, data: Any, field: str) -> tuple[list, list[str]]:
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of objects or {{\"data\": [...]}}, got "
                        f"{'an object without a data list' if isinstance(data, dict) else type(data).__name__}")
    return [_object(obj, f"{name}[{i}]", field) for i, obj in enumerate(data)], [f"{name}[{i}]" for i in range(len(data))]


def _parquet(name: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{name}: reading Parquet needs pyarrow: {EXTRA_HINT}") from None
    try:
        return pq.read_table(name).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types on a bad file
        raise DataError(f"{name}: cannot read Parquet ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _folder(name: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: reading a dataset folder needs the datasets package: {EXTRA_HINT}") from None
    if os.path.exists(os.path.join(name, "dataset_dict.json")):
        with open(os.path.join(name, "dataset_dict.json"), encoding="utf-8") as fh:
            splits = json.load(fh).get("splits", [])
        raise DataError(f"{name}: a DatasetDict with splits {', '.join(splits)}: point at one split's folder "
                        f"({os.path.join(name, splits[0] if splits else 'train')})")
    try:
        if os.path.exists(os.path.join(name, "state.json")):       # written by Dataset.save_to_disk
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 - `datasets` raises many types for a folder it cannot read
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{name}: cannot read the folder with datasets ({type(e).__name__}: {first})") from None
    if isinstance(ds, datasets.DatasetDict):   # load_dataset gives one entry per split
        splits = list(ds.keys())
        if len(splits) != 1:
            raise DataError(f"{name}: the folder holds the splits {', '.join(splits)}: point at one split's files")
        ds = ds[splits[0]]
    return ds.to_list()


def read_records(path: str | os.PathLike, field: str = "prompt") -> tuple[list, list[str]]:
    """(rows, locations) of a dataset file or folder (see the module docstring): rows are dicts
    (structured formats) or strings (plain text). `field` only words the errors. Raises DataError."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise DataError(f"prompt file not found: {name}")
    if os.path.isdir(name):
        rows = _folder(name)
        sources = [f"{name}[{i}]" for i in range(len(rows))]
    elif name.endswith(".parquet"):
        rows = _parquet(name)
        sources = [f"{name}[{i}]" for i in range(len(rows))]
    else:
        text = _read_text(name)
        lines = text.splitlines()
        first = next((line.strip() for line in lines if line.strip()), "")
        rows = None
        if name.endswith(".json") and first:
            try:
                rows, sources = _json(name, json.loads(text), field)
            except json.JSONDecodeError as e:
                if not _is_json_object(first):   # else JSON Lines named .json (as `Dataset.to_json` writes)
                    raise DataError(f"{name}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if rows is None and (name.endswith(".jsonl") or _is_json_object(first)):
            rows, sources = _jsonl(name, lines, field)
        elif rows is None:
            sources = [f"{name}:{i}" for i, line in enumerate(lines, start=1) if line.strip()]
            rows = [line for line in lines if line.strip()]
    if not rows:
        raise DataError(f"{name}: no prompts found (the file is empty)")
    return rows, sources
