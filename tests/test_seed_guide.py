"""Every runnable command of the seed guide, copied verbatim into tests/seed_snippets/, runs and prints what the guide
shows. Two changes only, each stated where it is made: the benchmark's loop runs 2 steps instead of 100 (every
`100` in that snippet becomes `2`), and the multi-node line runs as two nodes on localhost with one process each
(`--master_addr`, `--master_port` and `--nproc_per_node` rewritten). Quick Start 2 runs in the session Quick Start 1
left (it uses `torch` imported there), as a reader typing them in order would.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = Path(__file__).resolve().parent / "seed_snippets"
BIN = Path(sys.executable).parent  # python, torchrun: the environment this suite runs in


def commands(name: str) -> list[str]:
    """The shell commands of a snippet file: comment and blank lines dropped, a quoted argument that spans lines
    (python -c "...") kept whole."""
    out, current = [], ""
    for line in (SNIPPETS / name).read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current = f"{current}\n{line}" if current else line
        if current.count('"') % 2 == 0:
            out.append(current)
            current = ""
    return out


def run(cmd: str, cwd: Path = ROOT, timeout: int = 300, **env: str) -> str:
    """Run one command line with the suite's python and torchrun first on PATH; returns stdout + stderr."""
    full = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "PET_MASTER_PORT": str(_free_port()),
        **env,
    }  # torchrun's --master_port, the command left verbatim
    r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def test_quick_start_1_and_2():
    one, two = (SNIPPETS / "quick_start_1.py").read_text(), (SNIPPETS / "quick_start_2.py").read_text()
    out = run(f"python -c {shlex.quote(one + chr(10) + two)}")
    params = int(
        next(line for line in out.splitlines() if line.startswith("Model parameters:")).split()[-1].replace(",", "")
    )
    assert params > 10_000_000  # 6 layers of d=512 and a 10k vocabulary
    assert "Output shape: torch.Size([2, 10, 10000])" in out
    # LoRA rank 16 on a 512x512 linear: 2 x 16 x 512 trainable of 512 x 512 + 512 + 16384
    assert "Total parameters: 279,040" in out and "Trainable parameters: 16,384" in out
    assert "Trainable ratio: 5.87%" in out and "Adapter output shape: torch.Size([2, 10, 512])" in out


def test_verify_installation():
    (cmd,) = commands("verify_installation.sh")
    out = run(cmd)
    for line in (
        "PyTorch version:",
        "CUDA available:",
        "Transformers version:",
        "All dependencies installed successfully!",
    ):
        assert line in out, out


def test_benchmark_training_speed():
    cmd = commands("performance_testing.sh")[2]
    assert "range(100)" in cmd and "100 / (time.time()" in cmd
    out = run(cmd.replace("100", "2"))  # the stated substitution: 2 steps instead of 100
    speed = next(line for line in out.splitlines() if line.startswith("Training speed:"))
    assert speed.endswith("steps/sec") and float(speed.split()[2]) > 0


def test_torchrun_two_processes():
    cmd = commands("distributed_setup.sh")[0]
    assert cmd == "torchrun --nproc_per_node=2 exercise.py" == commands("performance_testing.sh")[0]
    out = run(cmd, STEPS="6")
    assert "world size 2" in out and "rank 1 step" in out and "done: final global loss" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost():
    """The guide's multi-node line with both "nodes" on this machine: 127.0.0.1, a free port, one process each."""
    line = commands("distributed_setup.sh")[1]
    assert '--master_addr="192.168.1.1" --master_port=12355 --nproc_per_node=4' in line
    local = line.replace('"192.168.1.1"', "127.0.0.1").replace("12355", str(_free_port()))
    local = local.replace("--nproc_per_node=4", "--nproc_per_node=1")
    full = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "STEPS": "6"}
    procs = [subprocess.Popen(["bash", "-c", local.replace("--node_rank=0", f"--node_rank={rank}")], cwd=ROOT,
                              env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "world size 2" in outs[0] and "done: final global loss" in outs[0]
    assert "rank 1 step" in outs[1]


def test_memory_profiler():
    cmd = commands("performance_testing.sh")[1]
    assert cmd == "python -m memory_profiler exercise.py"
    out = run(cmd, STEPS="4")
    assert "Mem usage" in out and "Increment" in out and "def main()" in out and "done: final global loss" in out


@pytest.fixture()
def guide_folder(tmp_path):
    """The two files the guide's test commands name, in a folder of their own (coverage writes htmlcov/ there)."""
    for name in ("exercise.py", "test_llm_training.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_unit_test_commands(guide_folder):
    """All three verbatim: the whole file (-v), one class, and with coverage (about 20 s each on 2 cores)."""
    every, one_class, coverage = commands("unit_tests.sh")
    assert coverage == "python -m pytest test_llm_training.py --cov=exercise --cov-report=html"
    out = run(every, guide_folder)
    assert "TestModel::" in out and "TestDistributedTraining::" in out and " passed" in out
    out = run(one_class, guide_folder)
    assert "TestDistributedTraining::" in out and "TestModel::" not in out and " passed" in out
    out = run(coverage, guide_folder)
    assert "Coverage HTML written to dir htmlcov" in out and (guide_folder / "htmlcov" / "index.html").is_file()
