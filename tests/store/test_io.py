"""Model directories by hub id from the local Hugging Face cache (the documented layout, no network), and the
error naming where it looked."""

from __future__ import annotations

import pytest

from llmstages.cli import main
from llmstages.errors import UserError
from llmstages.store import load_model, load_tokenizer
from llmstages.store.io import resolve_model_path
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


@pytest.mark.parametrize(
    ("ref", "says"),
    [(b"", "is empty"), (b"\x89PNG\r\n\x1a\n\x00\x00", r"does not hold a commit hash \(40 hex digits\)")],
)
def test_a_damaged_ref_is_named(cache, capsys, ref, says):
    """An empty or binary refs/main: the ref named, not a traceback or "a snapshots folder without config.json"."""
    main_ref = cache.parents[1] / "refs" / "main"
    main_ref.write_bytes(ref)
    with pytest.raises(UserError, match=rf"refs/main {says}: the cached copy of owner/tiny is damaged"):
        resolve_model_path("owner/tiny")
    assert resolve_model_path("owner/tiny@v1") == cache  # the other ref still resolves
    assert main(["generate", "--model", "owner/tiny", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_symlinks_that_lead_nowhere_are_named(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(UserError, match=r"model directory '.*/a' is a symlink loop"):
        resolve_model_path(tmp_path / "a")
    with pytest.raises(UserError, match=r"model directory '.*/a/model' is a symlink loop"):
        resolve_model_path(tmp_path / "a" / "model")  # a loop above the path
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match=r"'.*/dangling' is a symlink to '.*/gone', which does not exist$"):
        resolve_model_path(tmp_path / "dangling")
