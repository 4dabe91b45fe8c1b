"""The pre-training stage end to end from the CLI: it learns, resumes exactly, and refuses bad input cleanly."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from llmstages.cli import main
from llmstages.monitor.metrics import read_metrics
from llmstages.train import loop as loop_mod

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.block_size=64",
    "data.builtin_size_mb=0.05", "data.vocab_size=400", "data.workers=1",
    "train.max_steps=12", "train.batch_size=4", "train.seq_len=32", "train.log_every=1", "train.eval_every=6",
    "train.save_every=100", "train.warmup_steps=2", "train.lr=3e-3", "train.precision=fp32", "train.eval_batches=2",
]  # fmt: skip


def _pretrain(out: Path, *extra: str) -> int:
    return main(["pretrain", f"out_dir={out}", *SMALL, *extra])


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r and "event" not in r]


def test_exact_resume_after_a_signal(tmp_path, monkeypatch):
    assert _pretrain(tmp_path / "straight") == 0
    straight = _losses(tmp_path / "straight")
    assert [s for s, _ in straight] == list(range(1, 13))

    # Second run: a SIGTERM arrives during step 6; the loop saves a checkpoint and stops.
    real_step = loop_mod.Trainer.optimizer_step

    def step_then_signal(self, loss):
        out = real_step(self, loss)
        if self.state.step == 5:  # the step being taken is the 6th
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop_mod.Trainer, "optimizer_step", step_then_signal)
    assert _pretrain(tmp_path / "split") == 130
    monkeypatch.undo()
    assert (tmp_path / "split/checkpoints/step_6").is_dir()
    assert _pretrain(tmp_path / "split", "resume=true") == 0
    assert _losses(tmp_path / "split") == straight  # identical floats, not just close
    val = [r for r in read_metrics(tmp_path / "split") if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 6, 12]  # the start record, then every eval_every


def test_tiny_recipe_learns_the_corpus(tmp_path):
    """The tiny recipe, cut to 50 steps: validation loss falls far below the corpus's unigram entropy."""
    code = main(["pretrain", "--config", str(ROOT / "configs" / "pretrain" / "tiny.yaml"), f"out_dir={tmp_path}",
                 "train.max_steps=50", "train.eval_every=50", "train.save_every=50"])  # fmt: skip
    assert code == 0
    records = read_metrics(tmp_path)
    entropy = records[0]["unigram_entropy"]
    val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    assert val < 0.5 * entropy, (val, entropy)  # measured: about 1.5 nats against 4.5
    assert (tmp_path / "final/model.safetensors").is_file() and (tmp_path / "final/tokenizer.json").is_file()
    assert main(["generate", "--model", str(tmp_path / "final"), "--prompt", "Ada lives in"]) == 0


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


@pytest.fixture()
def finished_run(tmp_path):
    out = tmp_path / "run"
    assert _pretrain(out, "train.max_steps=3") == 0
    return out


def _bad(out: Path, capsys, *argv: str) -> str:
    before = _snapshot(out)
    code = main(["pretrain", f"out_dir={out}", *SMALL, *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("llmstages: error:") and err.count("\n") == 1
    assert _snapshot(out) == before  # nothing deleted, nothing overwritten
    return err


def test_bad_input_leaves_the_run_untouched(finished_run, tmp_path, capsys):
    out = finished_run
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no .txt" in _bad(out, capsys, "resume=true", f"data.path={empty}")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "not a text file" in _bad(out, capsys, "resume=true", f"data.path={binary}")
    notjson = tmp_path / "d.jsonl"
    notjson.write_text('{"text": "a"}\n{"text": "b"}\n{oops}\n')
    assert "d.jsonl:3: not valid JSON" in _bad(out, capsys, "resume=true", f"data.path={notjson}")
    notext = tmp_path / "e.jsonl"
    notext.write_text('{"text": "a"}\n{"content": "b"}\n')
    assert "e.jsonl:2: no 'text' field" in _bad(out, capsys, "resume=true", f"data.path={notext}")
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("train:\n  max_step: 5\n")
    assert "did you mean 'train.max_steps'" in _bad(out, capsys, "--config", str(recipe))
    assert "above the model's context of 64" in _bad(out, capsys, "resume=true", "train.seq_len=128")
    assert "already holds checkpoints" in _bad(out, capsys)  # a fresh start would overwrite the run
    ckpt = out / "checkpoints/step_3/model.safetensors"
    ckpt.write_bytes(b"not a safetensors file")
    assert "corrupted checkpoint" in _bad(out, capsys, "resume=true")


def test_resolved_config_is_written(finished_run):
    text = (finished_run / "config.yaml").read_text()
    assert "max_steps: 3" in text and "n_layers: 2" in text
    metrics = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*metrics)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "val_loss", "val_ppl"} <= keys
    assert any((finished_run / "tb").iterdir())


def test_a_corpus_too_short_for_a_window_is_refused_before_anything_is_written(tmp_path, capsys):
    """The train split must hold train.seq_len + 1 tokens; setup says so, so the corrected command then runs (it
    is not refused as 'an earlier pretrain run')."""
    short = tmp_path / "short.txt"
    short.write_text("Ada lives in Paris.\n")
    out = tmp_path / "run"
    assert _pretrain(out, f"data.path=[{short}]", "data.val_fraction=0") == 2
    err = capsys.readouterr().err.strip()
    assert "the train split holds" in err and "fewer than train.seq_len + 1 = 33" in err and len(err.splitlines()) == 1
    assert not out.exists()
    short.write_text("Ada lives in Paris. Her cat is grey and she works as a baker near the old river bridge.\n" * 40)
    assert _pretrain(out, f"data.path=[{short}]", "data.val_fraction=0", "train.max_steps=1") == 0


def test_a_pretrain_only_strategy_is_named_as_such_outside_torchrun(tmp_path, capsys):
    """`sft dist.strategy=tp` would be refused under torchrun too: say that, not 'use torchrun'."""
    assert main(["sft", f"out_dir={tmp_path / 'sft'}", "model.preset=llama_tiny", "dist.strategy=tp"]) == 2
    err = capsys.readouterr().err
    assert "dist.strategy=tp is supported by pretrain only" in err and not (tmp_path / "sft").exists()
