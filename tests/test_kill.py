"""Runs ended or disturbed from outside: kill -9 in the middle of writing a folder leaves the old folder or the new
one, never a mix (the tokenizer with its shards, an export replaced with --force); a run still going is not resumed
into, and the lock of a killed one is taken over; a resume whose base model was replaced is refused; a run resumed
after a signal logs what the uninterrupted one logs; a reward function that calls sys.exit is named."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmstages.cli import main
from llmstages.data.builtin import builtin_corpus
from llmstages.data.text import tokenizer_hash
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.monitor.metrics import read_metrics
from llmstages.outputs import RUN_LOCK, _started, check_run_lock, claim_run_lock
from llmstages.train.checkpoint import latest_checkpoint
from tests.helpers import builtin_base, stop_after_step

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


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: its content's digest and its modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_resume_refuses_a_base_model_that_is_not_the_one_the_run_started_from(tmp_path, capsys):
    """LoRA SFT reads its frozen weights back from model.path for final/: a folder replaced there by another model
    of the same shapes would become the final model's base. The resume is refused in setup, naming both digests,
    and the run folder is left as it was; with the original back it resumes."""
    from safetensors.torch import load_file, save_file

    from tests.stages.test_sft import FAST

    base, run, data = builtin_base(tmp_path / "base"), tmp_path / "run", tmp_path / "sft.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i} plus one?", "completion": f"{i + 1}."}) + "\n" for i in range(8))
    )
    argv = ["sft", f"model.path={base}", f"out_dir={run}", f"data.path=[{data}]", "peft.method=lora", *FAST]
    assert main([*argv, "train.max_steps=2", "train.save_every=1"]) == 0
    before = snapshot(run)
    original = tmp_path / "original"
    base.rename(original)
    shutil.copytree(original, base)
    tensors = load_file(str(base / "model.safetensors"))
    tensors["blocks.0.attn.q_proj.weight"] = tensors["blocks.0.attn.q_proj.weight"].flip(0)
    save_file(tensors, str(base / "model.safetensors"))
    capsys.readouterr()
    assert main([*argv, "train.max_steps=4", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llmstages: error: model.path {base} is not the model this run started from") and \
        err.count("\n") == 1 and "(nothing was written)" in err, err  # fmt: skip
    assert snapshot(run) == before
    shutil.rmtree(base)
    original.rename(base)
    assert main([*argv, "train.max_steps=4", "resume=true"]) == 0
    final, original = load_file(str(run / "final/model.safetensors")), load_file(str(base / "model.safetensors"))
    assert final.keys() == original.keys() and all(final[k].equal(original[k]) for k in final)  # the run's own base


def test_a_run_still_going_is_not_resumed_into_and_a_killed_ones_lock_is_taken_over(tmp_path, capsys):
    from tests.stages.test_pretrain import SMALL

    run = tmp_path / "run"
    argv = ["pretrain", f"out_dir={run}", *SMALL, "train.eval_every=1000", "train.save_every=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "llmstages", *argv, "train.max_steps=100000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ((run / RUN_LOCK).is_file() and latest_checkpoint(run / "checkpoints")) and proc.poll() is None:
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.1)
        assert json.loads((run / RUN_LOCK).read_text())["pid"] == proc.pid
        capsys.readouterr()
        assert main([*argv, "train.max_steps=100000", "resume=true"]) == 2
        err = capsys.readouterr().err
        assert f"is being written by a run that is still going (process {proc.pid}" in err and err.count("\n") == 1
        assert proc.poll() is None  # refused while it was still going
    finally:
        proc.kill()
        proc.wait()
    assert (run / RUN_LOCK).is_file()  # kill -9 leaves a stale lock
    step = int(latest_checkpoint(run / "checkpoints").name.removeprefix("step_"))
    assert main([*argv, f"train.max_steps={step + 2}", "resume=true"]) == 0
    assert not (run / RUN_LOCK).exists()  # given back at the end
    assert (run / "final" / "model.safetensors").is_file()


def test_the_lock_tells_a_running_process_from_an_ended_one(tmp_path):
    """A lock whose process runs (here: the parent of this test) refuses; one whose pid was reused by a later
    process (another start time) or whose process ended is taken over; one from another host cannot be checked
    and names the file to delete."""
    parent = os.getppid()
    host = socket.gethostname()

    def lock(**holder):
        (tmp_path / RUN_LOCK).write_text(json.dumps(holder))

    lock(pid=parent, host=host, started=_started(parent))
    with pytest.raises(UserError, match=f"still going \\(process {parent}, "):
        check_run_lock(tmp_path)
    lock(pid=parent, host=host, started="1")  # the pid now names another process
    check_run_lock(tmp_path)
    lock(pid=parent, host="elsewhere", started=None)
    with pytest.raises(UserError, match=f"on host elsewhere .*delete {tmp_path / RUN_LOCK} if it has"):
        claim_run_lock(tmp_path)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    lock(pid=ended.pid, host=host, started=None)
    claim_run_lock(tmp_path)
    assert json.loads((tmp_path / RUN_LOCK).read_text())["pid"] == os.getpid()


def test_ppo_resumed_in_the_middle_of_a_rollout_logs_what_the_uninterrupted_run_logs(tmp_path, monkeypatch):
    """Every logged figure, the rollout statistics restored from the checkpoint included (kl_coef 0.05, not the
    float32 0.05000000074505806), equals the uninterrupted run's; only the timings differ."""
    from tests.stages.test_ppo import FAST

    base = builtin_base(tmp_path / "base")

    def ppo(out: Path, *extra: str) -> int:
        return main(["ppo", f"model.path={base}", f"out_dir={out}", *FAST, "peft.method=lora", "ppo.target_kl=0.01",
                     "train.max_steps=3", "train.eval_every=100", *extra])  # fmt: skip

    assert ppo(tmp_path / "a") == 0
    stop_after_step(monkeypatch, 1)
    assert ppo(tmp_path / "b") == 130
    monkeypatch.undo()
    assert ppo(tmp_path / "b", "resume=true") == 0
    timing = {"tokens_per_s", "rollout_tokens_per_s", "rollout_s", "mfu"}

    def figures(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run) if "loss" in r]

    straight, resumed = figures(tmp_path / "a"), figures(tmp_path / "b")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed == straight
    assert resumed[2]["kl_coef"] == 0.05  # step 3: statistics of the rollout restored from step_2's checkpoint


def test_a_reward_function_that_calls_sys_exit_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "exits_when_called.py").write_text("import sys\n\ndef score(p, r, e):\n    sys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = builtin_base(tmp_path / "base")
    code = main(["grpo", f"model.path={base}", f"out_dir={tmp_path / 'run'}", "reward.fn=exits_when_called:score"])
    assert code == 2
    err = capsys.readouterr().err
    assert err == "llmstages: error: reward function reward.fn=exits_when_called:score called sys.exit(3); it must " \
        "return scores\n"  # fmt: skip
    assert not (tmp_path / "run").exists()
