"""Prompt files, split, tokenization (left padding, truncation) and the resumable iterator."""

import json
import warnings

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from jaxppo.data.prompts import PPODataset, PromptIterator, load_prompts, pad_prompts, split_prompts, tokenize_prompts
from jaxppo.errors import DataError, JaxppoError

WORDS = "<pad> <s> </s> <unk> the a cat dog sat on mat is big small".split()


def make_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (nothing downloaded); optionally prepends <s> like Llama."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(add_bos=False)


@pytest.fixture(scope="module")
def bos_tokenizer():
    return make_tokenizer(add_bos=True)


def ids(*words):
    return [WORDS.index(w) for w in words]


# ----------------------------------------------------------------------------- loading

def test_load_jsonl_and_plain_text(tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "the cat", "id": 1}\n\n{"prompt": "a dog"}\n')
    assert load_prompts(jsonl) == ["the cat", "a dog"]
    other = tmp_path / "p.jsonl"
    other.write_text('{"text": "x"}\n')
    assert load_prompts(other, field="text") == ["x"]
    looks_like_jsonl = tmp_path / "prompts.txt"
    looks_like_jsonl.write_text('{"prompt": "hi"}\n')
    assert load_prompts(looks_like_jsonl) == ["hi"]
    plain = tmp_path / "plain.txt"
    plain.write_text("the cat\n\n  \n{braces} are fine\r\nlast")
    assert load_prompts(plain) == ["the cat", "{braces} are fine", "last"]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"prompt": "a"\n', "prompts.jsonl:2: invalid JSON (Expecting ',' delimiter"),
    ('{"prompt": "ok"}\n\n{"text": "a", "id": 3}\n', "prompts.jsonl:3: missing field 'prompt' (keys present: 'text', 'id')"),
    ('{"prompt": 5}\n', "prompts.jsonl:1: field 'prompt' must be a string or a list of chat messages, got int"),
    ('["a"]\n', "prompts.jsonl:1: expected a JSON object with a 'prompt' field, got list"),
    ('{"prompt": "  "}\n', "prompts.jsonl:1: field 'prompt' is empty"),
    ("\n \n", "prompts.jsonl: no prompts found"),
])
def test_malformed_prompt_files(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_prompts(path)
    assert str(info.value).startswith(f"{tmp_path}/{message}")
    assert "\n" not in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="prompt file not found: .*nope.txt"):
        load_prompts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: no prompts found"):
        load_prompts(tmp_path / "empty.txt")
    assert issubclass(DataError, JaxppoError) and issubclass(DataError, ValueError)


def test_dataset_and_split(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(10)))
    prompts = load_prompts(path)
    dataset = PPODataset(prompts[:9])  # the seed's usage
    assert len(dataset) == 9 and dataset[0] == "p0" and list(dataset)[-1] == "p8"
    assert dataset[2:4].prompts == ["p2", "p3"]

    train, evals = split_prompts(prompts, 0.2, seed=3)
    assert len(evals) == 2 and len(train) == 8 and sorted(train + evals) == sorted(prompts)
    assert split_prompts(prompts, 0.2, seed=3) == (train, evals)  # deterministic
    assert train == [p for p in prompts if p in train]  # original order kept
    assert split_prompts(prompts, 0.0, seed=0) == (prompts, [])
    assert len(split_prompts(prompts[:3], 0.1, seed=0)[1]) == 1  # at least one eval prompt

    located = PPODataset.from_file(path)
    tr, ev = split_prompts(located, 0.2, seed=3)
    assert tr.prompts == train and ev.prompts == evals
    assert ev.sources == [f"{path}:{int(p[1:]) + 1}" for p in evals]
    with pytest.raises(DataError):
        split_prompts(["only"], 0.5, seed=0)


# ----------------------------------------------------------------------------- tokenization

def test_left_padding(tokenizer):
    input_ids, mask = tokenize_prompts(["the cat", "a dog sat on the mat", "is"], tokenizer, max_length=16)
    assert input_ids.dtype == np.int32 and mask.dtype == np.int32 and input_ids.shape == (3, 6)
    pad = tokenizer.pad_token_id
    np.testing.assert_array_equal(input_ids[0], [pad] * 4 + ids("the", "cat"))
    np.testing.assert_array_equal(input_ids[1], ids("a", "dog", "sat", "on", "the", "mat"))
    np.testing.assert_array_equal(mask[2], [0, 0, 0, 0, 0, 1])


def test_bos_only_when_the_tokenizer_adds_it(tokenizer, bos_tokenizer):
    assert tokenize_prompts(["the cat"], tokenizer, 8)[0].tolist() == [ids("the", "cat")]
    assert tokenize_prompts(["the cat"], bos_tokenizer, 8)[0].tolist() == [ids("<s>", "the", "cat")]


def test_left_truncation_warns_once(tokenizer, bos_tokenizer):
    prompts = ["a dog sat on the mat", "the big cat sat on a mat", "the cat"]
    with pytest.warns(UserWarning, match="2 of 3 prompts were longer than data.max_prompt_length=3") as record:
        input_ids, mask = tokenize_prompts(prompts, tokenizer, max_length=3)
    assert len(record) == 1
    assert input_ids.shape == (3, 3) and mask[0].all()
    np.testing.assert_array_equal(input_ids[0], ids("on", "the", "mat"))  # the last tokens are kept
    with pytest.warns(UserWarning):
        bos_ids, _ = tokenize_prompts(prompts[:1], bos_tokenizer, max_length=3)
    np.testing.assert_array_equal(bos_ids[0], ids("<s>", "the", "mat"))  # the BOS survives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_prompts(["the cat"], tokenizer, max_length=3)


def test_truncation_error_names_the_prompt(tokenizer):
    with pytest.raises(DataError, match=r"^prompt 1: the prompt has 6 tokens, more than data.max_prompt_length=4"):
        tokenize_prompts(["the cat", "a dog sat on the mat"], tokenizer, 4, truncation="error")
    with pytest.raises(DataError, match=r"^p.jsonl:9 \(prompt 1\): the prompt has 6 tokens"):
        tokenize_prompts(["the cat", "a dog sat on the mat"], tokenizer, 4, truncation="error",
                         source=["p.jsonl:3", "p.jsonl:9"])
    with pytest.raises(DataError, match="prompt 0: the prompt is empty after tokenization"):
        tokenize_prompts([""], tokenizer, 4)


def test_chat_template(tokenizer, monkeypatch):
    with pytest.raises(DataError, match="use_chat_template is on but the tokenizer has no chat_template"):
        tokenize_prompts(["the cat"], tokenizer, 8, use_chat_template=True)
    chat = make_tokenizer(add_bos=True)
    chat.chat_template = "unused: rendering is stubbed below (jinja2 is optional)"
    calls = []

    def render(messages, add_generation_prompt, tokenize):
        calls.append((messages, add_generation_prompt, tokenize))
        return "<s> " + messages[0]["content"] + " is"

    monkeypatch.setattr(chat, "apply_chat_template", render)
    input_ids, _ = tokenize_prompts(["the cat"], chat, 8, use_chat_template=True)
    assert calls == [([{"role": "user", "content": "the cat"}], True, False)]
    assert input_ids.tolist() == [ids("<s>", "the", "cat", "is")]  # no second BOS on top of the template's


# ----------------------------------------------------------------------------- iterator

def test_iterator_epochs_and_resume():
    it = PromptIterator(10, 4, seed=7)
    epoch0 = [next(it), next(it)]  # 2 batches, the last 2 prompts of the epoch are dropped
    assert all(b.shape == (4,) for b in epoch0)
    assert len(set(np.concatenate(epoch0).tolist())) == 8
    assert it.state_dict() == {"epoch": 0, "position": 8}
    assert next(it) is not None and it.epoch == 1

    reference = PromptIterator(10, 4, seed=7)
    expected = [next(reference).tolist() for _ in range(9)]
    first = PromptIterator(10, 4, seed=7)
    got = [next(first).tolist() for _ in range(5)]
    state = first.state_dict()
    resumed = PromptIterator(10, 4, seed=7)
    resumed.load_state_dict(dict(state))
    got += [next(resumed).tolist() for _ in range(4)]
    assert got == expected
    assert expected[0] != expected[2]  # epochs are reshuffled
    assert PromptIterator(10, 4, seed=8).__next__().tolist() != expected[0]


def test_iterator_small_dataset_wraps_and_no_shuffle():
    it = PromptIterator(3, 4, seed=0, shuffle=False)
    assert [next(it).tolist() for _ in range(3)] == [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0, 1, 2]]
    shuffled = PromptIterator(3, 8, seed=0)
    batch = next(shuffled)
    assert sorted(batch[:3].tolist()) == [0, 1, 2] and sorted(batch[3:6].tolist()) == [0, 1, 2]
    with pytest.raises(DataError):
        PromptIterator(0, 4, seed=0)
    with pytest.raises(DataError, match="does not fit 3 prompts"):
        it.load_state_dict({"epoch": 0, "position": 9})


def test_pad_prompts_left_pads_and_never_cuts_tokens():
    ids = np.array([[5, 6, 7], [1, 8, 9]], np.int32)
    mask = np.array([[1, 1, 1], [0, 1, 1]], np.int32)
    got_ids, got_mask = pad_prompts(ids, mask, 5, pad_id=1)
    np.testing.assert_array_equal(got_ids, [[1, 1, 5, 6, 7], [1, 1, 1, 8, 9]])
    np.testing.assert_array_equal(got_mask, [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    assert got_ids.dtype == ids.dtype and got_mask.dtype == mask.dtype
    same = pad_prompts(ids, mask, 3, pad_id=1)
    np.testing.assert_array_equal(same[0], ids)
    with pytest.raises(ValueError, match="3 tokens cannot be padded to 2"):
        pad_prompts(ids, mask, 2, pad_id=1)
