"""Dataset rows with columns, the file formats, chat-message prompts through a chat template."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxppo.data.dataset import PPODataset, check_messages, prompt_key
from jaxppo.data.prompts import load_prompt_records, load_prompts, run_datasets, split_prompts, tokenize_prompts
from jaxppo.data.tasks import get_task
from jaxppo.errors import DataError

ROWS = [{"prompt": "2+2=", "answer": "4", "level": 1},
        {"prompt": "3+3=", "answer": "6", "level": 2},
        {"prompt": "1+0=", "answer": "1", "level": 1}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- rows and columns

def test_rows_keep_their_columns():
    ds = PPODataset(ROWS)
    assert list(ds) == ["2+2=", "3+3=", "1+0="] and len(ds) == 3 and ds[1] == "3+3="
    assert ds.columns == {"answer": ["4", "6", "1"], "level": [1, 2, 1]}
    assert ds.columns_at(np.array([2, 0])) == {"answer": ["1", "4"], "level": [1, 1]}
    assert ds[1:].columns == {"answer": ["6", "1"], "level": [2, 1]} and ds[1:].prompts == ["3+3=", "1+0="]
    assert PPODataset(ROWS, columns=["answer"]).columns == {"answer": ["4", "6", "1"]}
    assert PPODataset(ROWS, columns=[]).columns == {}
    question = PPODataset([{"q": r["prompt"], "answer": r["answer"]} for r in ROWS], field="q")
    assert question.prompts == ["2+2=", "3+3=", "1+0="] and list(question.columns) == ["answer"]
    columnwise = PPODataset({"prompt": ["a", "b"], "answer": ["1", "2"]})
    assert columnwise.prompts == ["a", "b"] and columnwise.columns == {"answer": ["1", "2"]}
    plain = PPODataset(["the cat", "a dog"])       # the seed's usage: prompts only
    assert plain.columns == {} and plain.columns_at([1]) == {} and plain.sources is None


def test_split_keeps_columns_and_sources(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(10)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    train, evals = split_prompts(PPODataset.from_file(path), 0.3, seed=1)
    assert len(train) == 7 and len(evals) == 3
    for part in (train, evals):
        assert part.columns["answer"] == [p[1:] for p in part.prompts]
        assert part.sources == [f"{path}:{int(p[1:]) + 1}" for p in part.prompts]
    empty = train.select([])
    assert len(empty) == 0 and empty.columns == {"answer": []}


@pytest.mark.parametrize("rows, kwargs, message", [
    ([ROWS[0], {"prompt": "x", "level": 1}], {}, "row 1: missing column 'answer'"),
    ([ROWS[0], {**ROWS[1], "extra": 0}], {}, "row 1: column 'extra' is not in the first row"),
    ([ROWS[0], {"answer": "4"}], {}, "row 1: missing field 'prompt' (keys present: 'answer')"),
    ([{"prompt": 7}], {}, "row 0: field 'prompt' must be a string or a list of chat messages, got int"),
    ([{"prompt": " "}], {}, "row 0: field 'prompt' is empty"),
    (["a", 3], {}, "row 1: a prompt must be a string, a list of chat messages or an object"),
    (["a", "b"], {"columns": ["answer"]}, "row 0: missing column 'answer' (a plain prompt has no columns)"),
    (ROWS, {"columns": ["answer", "prompt"]}, "data.columns lists the prompt field 'prompt'"),
    (ROWS, {"field": "question"}, "row 0: missing field 'question'"),
    ({"text": ["a"]}, {}, "no prompt field 'prompt' (columns: 'text'"),
    ([[{"role": "user", "content": "hi"}], [{"role": "bot", "content": "hi"}]], {},
     "row 1: message 0 has role 'bot', expected one of system, user, assistant"),
    ([{"prompt": [{"role": "user"}]}], {}, "row 0: message 0 needs a string 'content', got NoneType"),
    ([{"prompt": []}], {}, "row 0: a chat prompt must be a non-empty list of messages, got an empty list"),
])
def test_bad_rows_name_the_row(rows, kwargs, message):
    with pytest.raises(DataError) as info:
        PPODataset(rows, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_rows_in_files_name_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"prompt": "x", "level": 3}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:3: missing column 'answer'"):
        PPODataset.from_file(path)
    assert load_prompts(path) == ["2+2=", "x"]                  # prompts alone need no columns
    assert PPODataset.from_file(path, columns=["level"]).columns == {"level": [1, 3]}
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": [{"role": "x"}]}]))
    with pytest.raises(DataError, match=rf"^{chat}\[1\]: message 0 has role 'x'"):
        load_prompts(chat)


# ----------------------------------------------------------------------------- file formats

def test_json_jsonl_and_text_files(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(ROWS, indent=2))
    as_data = tmp_path / "data.json"
    as_data.write_text(json.dumps({"data": ROWS}))
    lines_named_json = write_jsonl(tmp_path / "lines.json", ROWS)     # what `Dataset.to_json` writes
    for path in (as_list, as_data, lines_named_json, write_jsonl(tmp_path / "rows.jsonl", ROWS)):
        ds = PPODataset.from_file(path, columns=["answer"])
        assert ds.prompts == ["2+2=", "3+3=", "1+0="] and ds.columns == {"answer": ["4", "6", "1"]}, path
    assert PPODataset.from_file(as_list).sources == [f"{as_list}[{i}]" for i in range(3)]
    assert PPODataset.from_file(lines_named_json).sources == [f"{lines_named_json}:{i}" for i in (1, 2, 3)]
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond\n")
    ds = PPODataset.from_file(text)
    assert ds.prompts == ["first", "second"] and ds.columns == {} and ds.sources == [f"{text}:1", f"{text}:3"]
    assert load_prompt_records(as_list, columns=["level"]) == [("2+2=", f"{as_list}[0]"), ("3+3=", f"{as_list}[1]"),
                                                               ("1+0=", f"{as_list}[2]")]


@pytest.mark.parametrize("name, content, message", [
    ("bad.json", '[{"prompt": "a"},\n {"prompt": }]', "bad.json:2: invalid JSON"),
    ("obj.json", '{"rows": []}', "obj.json: expected a JSON list of objects or {\"data\": [...]}"),
    ("items.json", '["a"]', "items.json[0]: expected a JSON object with a 'prompt' field, got str"),
    ("empty.json", "[]", "empty.json: no prompts found"),
    ("list.jsonl", '["a"]\n', "list.jsonl:1: expected a JSON object with a 'prompt' field, got list"),
])
def test_malformed_json_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as info:
        PPODataset.from_file(tmp_path / name)
    assert str(info.value).startswith(f"{tmp_path}/{message}") and "\n" not in str(info.value)


def test_parquet_file(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    ds = PPODataset.from_file(path)
    assert ds.prompts == ["2+2=", "3+3=", "1+0="] and ds.columns == {"answer": ["4", "6", "1"], "level": [1, 2, 1]}
    assert ds.sources[2] == f"{path}[2]"
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet: cannot read Parquet"):
        PPODataset.from_file(tmp_path / "junk.parquet")


def test_without_the_optional_packages(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)       # import -> ImportError
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "rows.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"rows.parquet: reading Parquet needs pyarrow: pip install 'jaxppo\[datasets\]'"):
        PPODataset.from_file(tmp_path / "rows.parquet")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: reading a dataset folder needs the datasets package: pip install"):
        PPODataset.from_file(tmp_path / "folder")


def test_datasets_objects_and_folders(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    hf = datasets.Dataset.from_list(ROWS)
    ds = PPODataset(hf, columns=["answer"])
    assert ds.prompts == ["2+2=", "3+3=", "1+0="] and ds.columns == {"answer": ["4", "6", "1"]}
    hf.save_to_disk(str(tmp_path / "saved"))
    saved = PPODataset.from_file(tmp_path / "saved")
    assert saved.prompts == ds.prompts and saved.columns["level"] == [1, 2, 1]
    assert saved.sources[0] == f"{tmp_path / 'saved'}[0]"
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "part.jsonl", ROWS)
    assert PPODataset.from_file(tmp_path / "files").columns["answer"] == ["4", "6", "1"]
    splits = datasets.DatasetDict({"train": hf, "test": hf})
    splits.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"dict: a DatasetDict with splits train, test: point at one split's folder"):
        PPODataset.from_file(tmp_path / "dict")
    with pytest.raises(DataError, match=r"a DatasetDict with splits train, test: pass one split"):
        PPODataset(splits)


# ----------------------------------------------------------------------------- chat prompts

WORDS = "<pad> <s> </s> <unk> system user assistant : be brief the cat sat hi".split()
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", padding_side="left")
    tok.chat_template = TEMPLATE
    return tok


def ids(text):
    return [WORDS.index(w) for w in text.split()]


def test_chat_messages_go_through_the_template(chat_tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}]
    got, mask = tokenize_prompts([messages, "hi"], chat_tokenizer, max_length=32)
    assert got[0].tolist() == ids("<s> system : be brief user : the cat sat assistant :")
    assert got[1][mask[1] > 0].tolist() == ids("hi")            # a string stays plain text ...
    wrapped, _ = tokenize_prompts(["hi"], chat_tokenizer, 32, use_chat_template=True)
    assert wrapped[0].tolist() == ids("<s> user : hi assistant :")   # ... unless use_chat_template
    ds = PPODataset([{"prompt": messages, "answer": "x"}])
    assert ds[0] == messages and ds.columns == {"answer": ["x"]}    # reward functions get the messages as is
    assert prompt_key(messages) == json.dumps(messages, sort_keys=True)


def test_malformed_messages_name_the_row(chat_tokenizer):
    bad = [{"role": "user", "content": "hi"}, {"content": "no role"}]
    with pytest.raises(DataError, match=r"^p.jsonl:4 \(prompt 1\): message 1 has role None"):
        tokenize_prompts(["hi", bad], chat_tokenizer, 32, source=["p.jsonl:2", "p.jsonl:4"])
    with pytest.raises(DataError, match=r"row 3: message 0 is a str"):
        check_messages(["hi"], "row 3")
    plain = PreTrainedTokenizerFast(tokenizer_object=chat_tokenizer.backend_tokenizer, pad_token="<pad>")
    with pytest.raises(DataError, match=r"^prompt 0 is a list of chat messages but the tokenizer has no chat_template"):
        tokenize_prompts([bad[:1]], plain, 32)


# ----------------------------------------------------------------------------- run datasets and tasks

def config(**data):
    d = dict(prompts=None, eval_prompts=None, eval_fraction=0.1, prompt_field="prompt")
    return SimpleNamespace(data=SimpleNamespace(**{**d, **data}), reward=SimpleNamespace(task="letters"),
                           train=SimpleNamespace(seed=0, eval_every=0))


def test_run_datasets_with_columns(tmp_path):
    train, evals = run_datasets(config(), None, None)
    assert len(train) + len(evals) == len(get_task("letters").prompts()) and len(evals) > 0
    assert all(a in p for p, a in zip(train.prompts, train.columns["answer"]))
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    train, evals = run_datasets(config(prompts=str(path), eval_fraction=0.0), None, None, columns=["level"])
    assert train.columns == {"level": [1, 2, 1]} and len(evals) == 0
    train, evals = run_datasets(config(), ROWS, ROWS[:1])
    assert train.columns["answer"] == ["4", "6", "1"] and evals.columns["answer"] == ["4"]
