"""Pre-training data: reading files, tokenizing into shards, sampling windows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmstages.data.text import TokenShards, iter_documents, prepare_shards, unigram_entropy
from llmstages.errors import UserError
from tests.helpers import TEXT, tiny_tokenizer


def test_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n\n{"text": "second"}\n')
    (tmp_path / "c.json").write_text(json.dumps([{"text": "third"}, "fourth"]))
    assert sorted(iter_documents([tmp_path])) == sorted(["plain text document", "first", "second", "third", "fourth"])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": nope}\n', "bad.jsonl:3: not valid JSON"),
        ("bad.jsonl", '{"text": "ok"}\n{"body": "x"}\n', "bad.jsonl:2: no 'text' field (keys: body)"),
        ("bad.jsonl", '{"text": 5}\n', "bad.jsonl:1: 'text' must be a string"),
        ("bin.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00", "bin.txt:3: not a text file"),  # the line of the NUL
        ("latin.txt", "café".encode("latin-1"), "latin.txt:1: not UTF-8 text"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as e:
        list(iter_documents([p]))
    assert message in str(e.value)


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(UserError, match="has no .txt"):
        list(iter_documents([tmp_path]))
    with pytest.raises(UserError, match="does not exist"):
        list(iter_documents([tmp_path / "nope"]))


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_hold_every_document_joined_with_eos(tmp_path, workers):
    tok = tiny_tokenizer()
    docs = [f"{t} number {i}" for i, t in enumerate(TEXT)]
    meta = prepare_shards(docs, tok, tmp_path / "s", val_fraction=0.2, seed=1, workers=workers)
    shards = TokenShards.open(tmp_path / "s")
    assert meta["documents"] == len(docs) and meta["dtype"] == "uint16"
    both = np.concatenate([shards.train, shards.val])
    assert (both == tok.eos_id).sum() == len(docs)
    expected = sum(len(tok.encode(d)) + 1 for d in docs)
    assert len(both) == expected and 0 < len(shards.val) < len(shards.train)
    # Documents come back whole: decoding the train split between EOS tokens gives original documents.
    pieces = np.split(np.asarray(shards.train), np.where(np.asarray(shards.train) == tok.eos_id)[0] + 1)
    assert all(tok.decode(p[:-1].tolist()) in docs for p in pieces if len(p))


def test_sampling_is_a_function_of_the_key(tmp_path):
    tok = tiny_tokenizer()
    prepare_shards(TEXT, tok, tmp_path, val_fraction=0.0)
    shards = TokenShards.open(tmp_path)
    x1, y1 = shards.batch("train", (0, 5, 1, 0), 4, 16)
    x2, y2 = shards.batch("train", (0, 5, 1, 0), 4, 16)
    x3, _ = shards.batch("train", (0, 6, 1, 0), 4, 16)
    assert np.array_equal(x1, x2) and not np.array_equal(x1, x3)
    assert np.array_equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one
    assert x1.shape == (4, 16) and x1.dtype == np.int64
    assert 0 < unigram_entropy(shards, "train") < np.log(tok.vocab_size)


def test_failed_preparation_leaves_nothing(tmp_path):
    tok = tiny_tokenizer()
    (tmp_path / "keep.txt").write_text("mine")

    def docs():
        yield "one document"
        raise UserError("data.jsonl:2: not valid JSON")

    with pytest.raises(UserError):
        prepare_shards(docs(), tok, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    ("meta", "says"),
    [
        (b"null", "meta.json: expected a JSON object ({...}), got null"),
        (b'{"dtype": "uint16"}', "meta.json: not the meta of token shards (KeyError('train_tokens'))"),
        (b'{"dtype": "\xff"}', "meta.json:1: not UTF-8 text"),
    ],
)
def test_a_damaged_shard_meta_is_named(tmp_path, meta, says):
    (tmp_path / "meta.json").write_bytes(meta)
    with pytest.raises(UserError) as e:
        TokenShards.open(tmp_path)
    assert says in str(e.value)
