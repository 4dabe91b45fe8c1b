"""Tokenizers: trained here, saved, loaded by us and by transformers alike; the CLI writes shards too."""

from __future__ import annotations

import json

import pytest

from llmstages.cli import main
from llmstages.data.text import TokenShards
from llmstages.data.tokenizer import EOS, ROLE_TOKENS, Tokenizer
from tests.helpers import TEXT, tiny_tokenizer


def test_roundtrip_and_specials(tmp_path):
    tok = tiny_tokenizer()
    text = "Ada lives in Oakfield and keeps a grey cat."
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id is not None and tok.encode(text, add_eos=True)[-1] == tok.eos_id
    assert all(tok.token_to_id(t) is not None for t in ROLE_TOKENS)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(text) == tok.encode(text) and again.eos_token == EOS
    assert again.chat_template == tok.chat_template
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text) and hf.eos_token == EOS


def test_cli_trains_and_tokenizes(tmp_path, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    out = tmp_path / "tok"
    assert main(["tokenizer", "--data", str(data), "--vocab-size", "320", "--out", str(out), "--tokenize",
                 "--workers", "1"]) == 0  # fmt: skip
    tok = Tokenizer.load(out)
    assert 300 <= tok.vocab_size <= 320
    shards = TokenShards.open(out)
    assert shards.meta["documents"] == len(TEXT) and shards.meta["vocab_size"] == tok.vocab_size
    assert main(["tokenizer", "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
