"""The command line: output for good input; one line and exit code 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmstages.cli import main
from llmstages.model import GPT, preset
from llmstages.store import save_model
from tests.helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT(preset("llama_tiny", vocab_size=tok.vocab_size, n_layers=2, block_size=32,
                       eos_token_id=tok.eos_id))  # fmt: skip
    return save_model(model, tmp_path_factory.mktemp("m") / "model", tok)


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_a_continuation(model_dir, capsys):
    code, out, err = _run(["generate", "--model", str(model_dir), "--prompt", "Ada lives in",
                           "--max-new-tokens", "5"], capsys)  # fmt: skip
    assert code == 0 and out.strip() and not err


def _one_line_error(code, err, pattern):
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert pattern in err


def test_missing_directory(capsys):
    code, _, err = _run(["generate", "--model", "nowhere/at/all", "--prompt", "x"], capsys)
    _one_line_error(code, err, "does not exist")


def test_unknown_model_type(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    code, _, err = _run(["generate", "--model", str(tmp_path), "--prompt", "x"], capsys)
    _one_line_error(code, err, "model_type 't5' is not supported")


def test_misshaped_tensor(model_dir, tmp_path, capsys):
    import shutil

    bad = shutil.copytree(model_dir, tmp_path / "bad")
    t = load_file(bad / "model.safetensors")
    t["blocks.0.mlp.up_proj.weight"] = t["blocks.0.mlp.up_proj.weight"][:3]
    save_file(t, bad / "model.safetensors")
    code, _, err = _run(["generate", "--model", str(bad), "--prompt", "x"], capsys)
    _one_line_error(code, err, "'blocks.0.mlp.up_proj.weight' has shape")


def test_prompt_longer_than_context(model_dir, capsys):
    code, _, err = _run(["generate", "--model", str(model_dir), "--prompt", "Ada lives in Oakfield. " * 20], capsys)
    _one_line_error(code, err, "longer than the model's context of 32 tokens")


def test_exit_code_from_the_installed_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmstages", "generate", "--model", str(tmp_path / "x"),
                        "--prompt", "hi"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("llmstages: error:") and "Traceback" not in r.stderr


def test_export_hf_from_the_cli(model_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    code, _, _ = _run(["export", "--model", str(model_dir), "--format", "hf", "--out", str(tmp_path / "hf")], capsys)
    assert code == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 300, (1, 9))
    from llmstages.store import load_model

    with torch.no_grad():
        assert (hf(x).logits - load_model(model_dir)(x)).abs().max() < 1e-4


def test_a_full_disk_outside_the_guarded_saves_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    """A write the stages do not wrap themselves (here the resolved config.yaml) that finds the disk full ends in
    one line, exit 2, not a traceback; what was written before stays."""
    import errno

    def full(record, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("llmstages.train.start.write_config", full)
    out = tmp_path / "run"
    code, _, err = _run(["sft", f"model.path={model_dir}", f"out_dir={out}", "train.seq_len=24", "train.max_steps=1",
                         "train.precision=fp32", "monitor.tensorboard=false"], capsys)  # fmt: skip
    lines = [line for line in err.splitlines() if line.startswith("llmstages")]
    assert code == 2 and len(lines) == 1 and "no space left on device" in lines[0], err
    assert "Traceback" not in err and (out / "run.json").is_file()
