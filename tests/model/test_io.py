"""Model directories by hub id from the local Hugging Face cache (the documented layout, no network), and the
error naming where it looked."""

from __future__ import annotations

import pytest

from llmstages.cli import main
from llmstages.errors import UserError
from llmstages.model import load_model, load_tokenizer
from llmstages.model.io import resolve_model_path
from tests.helpers import hf_model, save_hf, tiny_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A hub cache holding owner/tiny at one commit, main pointing at it, and a tag v1 pointing at it too."""
    root = tmp_path / "hub"
    repo = root / "models--owner--tiny"
    save_hf(hf_model("llama"), repo / "snapshots" / COMMIT, tiny_tokenizer())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(COMMIT + "\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.chdir(tmp_path)  # "owner/tiny" is not a folder here
    return repo / "snapshots" / COMMIT


def test_a_hub_id_resolves_to_its_snapshot(cache):
    for name in ("owner/tiny", "owner/tiny@v1", f"owner/tiny@{COMMIT}"):
        assert resolve_model_path(name) == cache
    assert load_model("owner/tiny").config.n_layers == load_model(cache).config.n_layers
    assert load_tokenizer("owner/tiny").vocab_size == load_tokenizer(cache).vocab_size


def test_hf_home_layout(cache, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # $HF_HOME/hub is the fixture's cache
    assert resolve_model_path("owner/tiny") == cache


def test_not_in_the_cache(cache, capsys):
    with pytest.raises(UserError, match=r"'owner/other' does not exist, and as a hub id it is not in the local"):
        resolve_model_path("owner/other")
    with pytest.raises(UserError, match=r"not in the local Hugging Face cache \(.*hub"):
        resolve_model_path("owner/tiny@v2")  # no such ref
    assert main(["generate", "--model", "owner/missing", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "hub" in err and err.count("\n") == 1
    with pytest.raises(UserError, match=r"model directory 'no_such_dir' does not exist$"):
        resolve_model_path("no_such_dir")
