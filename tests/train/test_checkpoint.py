"""Checkpoints: a crash mid-write leaves the previous checkpoint intact; a corrupt, incomplete or edited one is
skipped for the one before it, with one line saying why."""

from __future__ import annotations

import json
import shutil

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
    with pytest.raises(UserError, match="no checkpoint in .* can be read"):
        ckpt.newest_loadable(tmp_path)


def _drop(key: str, file: str):
    def edit(path):
        if file == "state.json":
            state = json.loads((path / file).read_text())
            del state[key]
            (path / file).write_text(json.dumps(state))
        else:
            opt = torch.load(path / file, weights_only=True)
            del opt[key]
            torch.save(opt, path / file)

    return edit


def _set_step(step: int):
    def edit(path):
        state = json.loads((path / "state.json").read_text())
        (path / "state.json").write_text(json.dumps({**state, "step": step}))

    return edit


def _set_rng(path):
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "rng": {"python": [3, [1, 2], None], "numpy": []}}))


def _not_utf8(path):
    (path / "state.json").write_bytes(b"\xff\xfe" + (path / "state.json").read_bytes())


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (_drop("rng", "state.json"), "state.json has no 'rng'"),
        (_drop("torch_rng", "optimizer.pt"), "optimizer.pt has no torch random state"),
        (_drop("step", "state.json"), "state.json has no step number"),
        (_not_utf8, "UnicodeDecodeError"),
        (_set_step(999), "state.json says step 999, the folder is step_4"),
        (_set_step(2), "state.json says step 2, the folder is step_4"),
        (_set_rng, "state.json's 'rng' is not a random state"),
    ],
    ids=["no-rng", "no-torch-rng", "no-step", "not-utf8", "step-999", "step-2-in-step_4", "bad-rng"],
)
def test_an_incomplete_or_edited_checkpoint_is_skipped_for_the_one_before(tmp_path, capsys, edit, why):
    """Whatever is wrong with the newest checkpoint, resume takes the one before it and says why in one line;
    with none left that reads, the error names the first problem."""
    model, opt = _model_and_opt()
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {"tokens_seen": step})
    edit(tmp_path / "step_4")
    assert ckpt.newest_loadable(tmp_path) == tmp_path / "step_2"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and why in out and "resuming from step_2 instead" in out, out
    assert ckpt.newest_loadable(tmp_path) == tmp_path / "step_2" and capsys.readouterr().out == ""  # said once
    fresh, fresh_opt = _model_and_opt()
    assert ckpt.load_checkpoint(tmp_path / "step_2", fresh, fresh_opt)[0]["tokens_seen"] == 2
    shutil.rmtree(tmp_path / "step_2")
    with pytest.raises(UserError, match=f"no checkpoint in .* can be read .*{why}"):
        ckpt.newest_loadable(tmp_path)


def test_weights_digest_follows_the_weights(tmp_path):
    """The digest a run records of its base: equal for a copy of the weights, different once one tensor changes,
    whether the file is rewritten in place or replaced."""
    from safetensors.torch import save_file

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        save_file({"w": torch.ones(4, 4)}, str(d / "model.safetensors"))
        (d / "tokenizer.json").write_text(d.name)  # not a weight: not part of the digest
    assert ckpt.weights_digest(a) == ckpt.weights_digest(b)
    before = ckpt.weights_digest(a)
    save_file({"w": torch.ones(4, 4).index_fill_(0, torch.tensor([2]), 2.0)}, str(a / "model.safetensors"))
    assert ckpt.weights_digest(a) != before
    shutil.rmtree(b)
    shutil.copytree(a, b)
    assert ckpt.weights_digest(b) == ckpt.weights_digest(a)
