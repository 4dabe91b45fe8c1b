"""Checkpoints: a crash mid-write leaves the previous checkpoint intact; a corrupt one is a clear error."""

from __future__ import annotations

import pytest
import torch

from llmstages.errors import UserError
from llmstages.model import GPT, preset
from llmstages.train import checkpoint as ckpt


def _model_and_opt():
    model = GPT(preset("llama_tiny", vocab_size=128, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 128, (1, 8))).sum().backward()
    opt.step()
    return model, opt


def test_roundtrip_restores_everything(tmp_path):
    model, opt = _model_and_opt()
    ckpt.save_checkpoint(tmp_path, 3, model, opt, {"tokens_seen": 42})
    expected_next = torch.rand(3)
    torch.manual_seed(123)  # move the RNG; loading must bring back the saved state
    other, other_opt = _model_and_opt()
    state, _ = ckpt.load_checkpoint(tmp_path / "step_3", other, other_opt)
    assert state["step"] == 3 and state["tokens_seen"] == 42
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_next)
    assert other.lm_head.weight is other.tok_emb.weight  # the tie survives


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    ckpt.save_checkpoint(tmp_path, 1, model, opt, {})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt.torch, "save", killed)  # dies after model.safetensors is written
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, {})
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_1"
    fresh, fresh_opt = _model_and_opt()
    assert ckpt.load_checkpoint(tmp_path / "step_1", fresh, fresh_opt)[0]["step"] == 1
    # A hard kill leaves the temporary folder behind; it is never taken for a checkpoint and is cleaned next time.
    (tmp_path / ".step_2.tmp").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_1"
    ckpt.save_checkpoint(tmp_path, 2, model, opt, {})
    assert not (tmp_path / ".step_2.tmp").exists()


def test_keep_last_k(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_3", "step_4"]


def test_corrupted_checkpoint(tmp_path):
    model, opt = _model_and_opt()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, {})
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupted checkpoint"):
        ckpt.load_checkpoint(path, model, opt)


def test_an_unreadable_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, capsys):
    model, opt = _model_and_opt()
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    (tmp_path / "step_2" / "optimizer.pt").write_bytes(b"torn")  # a crash left it unreadable
    assert ckpt.newest_loadable(tmp_path) == tmp_path / "step_1"
    assert "resuming from step_1 instead" in capsys.readouterr().out
    (tmp_path / "step_1" / "state.json").write_text("{")
    ckpt._LOADABLE.clear()
    with pytest.raises(UserError, match="no checkpoint in .* can be read"):
        ckpt.newest_loadable(tmp_path)
