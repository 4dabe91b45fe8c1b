"""kill -9 in the middle of writing a folder leaves the old folder or the new one, never a mix: the tokenizer with
its shards (`llmstages tokenizer --tokenize`) and an export replaced with --force."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmstages.cli import main
from llmstages.data.builtin import builtin_corpus
from llmstages.data.text import tokenizer_hash
from llmstages.data.tokenizer import Tokenizer
from tests.helpers import builtin_base

ROOT = Path(__file__).resolve().parents[1]


def files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def killed(argv: list[str], after: float) -> int:
    """Start `llmstages argv` and SIGKILL it `after` seconds later (or let it finish); its exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "llmstages", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(after)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait()


def test_killed_tokenizer_leaves_the_old_folder_or_the_new_one(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(builtin_corpus(0, 0.6)))
    out = tmp_path / "tok"
    assert main(["tokenizer", "--data", str(data), "--out", str(out), "--vocab-size", "400", "--tokenize"]) == 0
    old = files(out)
    outcomes = set()
    for i, after in enumerate((0.3, 0.8, 1.5, 2.5, 4.0, 8.0)):
        vocab = str(500 + 50 * i)
        killed(["tokenizer", "--data", str(data), "--out", str(out), "--vocab-size", vocab, "--tokenize"], after)
        now = files(out)
        meta = json.loads((out / "meta.json").read_text())
        assert set(now) == set(old)  # never a folder with some files missing
        assert meta["tokenizer"] == tokenizer_hash(Tokenizer.load(out))  # the shards are the tokenizer's own
        outcomes.add("old" if now == old else "new")
        old = now
    assert "new" in outcomes  # the later kills come after the folder was replaced


def test_killed_export_leaves_the_old_export_or_the_new_one(tmp_path):
    base = builtin_base(tmp_path / "base")
    out = tmp_path / "hf"
    assert main(["export", "--model", str(base), "--format", "hf", "--out", str(out)]) == 0
    old = files(out)
    other = builtin_base(tmp_path / "base2")  # a merged export of it: our format, no generation_config.json
    for after in (0.5, 1.0, 1.5, 2.0, 3.0, 6.0):
        killed(["export", "--model", str(other), "--format", "merged", "--out", str(out), "--force"], after)
        now = files(out)
        assert now == old or ("model.safetensors" in now and "config.json" in now and "tokenizer.json" in now
                              and "generation_config.json" not in now), sorted(now)  # fmt: skip
        old = now
    assert "generation_config.json" not in old  # the merged export did land once a run got to finish
