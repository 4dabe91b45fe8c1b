"""`llmstages doctor`: what this machine offers for training, and settings that commonly go wrong.

Prints Python, torch and llmstages versions, the device (CUDA GPUs with their memory, bf16 support and NCCL, or
the CPU with its cores and whether bf16 runs natively), free memory and disk, which optional packages are
present, then one line per likely misconfiguration.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil
from pathlib import Path

OPTIONAL = ("transformers", "peft", "tensorboard", "matplotlib", "wandb", "mlflow")


def _meminfo() -> dict[str, int]:
    try:
        rows = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    return {r.split(":")[0]: int(r.split()[1]) * 1024 for r in rows if r.split()[1:]}


def report(where: str = ".") -> tuple[list[str], list[str]]:
    """(facts, warnings) about this machine."""
    import torch

    from llmstages import __version__
    from llmstages.model.generate import cpu_compiler
    from llmstages.train.start import fast_bf16

    facts = [
        f"python {platform.python_version()}, torch {torch.__version__}, llmstages {__version__}",
        f"platform {platform.platform()}",
    ]
    warnings = []
    cores = os.cpu_count() or 1
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            facts.append(
                f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute {p.major}.{p.minor}, "
                f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no (use fp16)'}"
            )
        nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
        facts.append(f"CUDA {torch.version.cuda}, NCCL {'.'.join(map(str, nccl)) if nccl else 'absent'}")
    else:
        bf16 = (
            "native (train.precision=auto picks bf16)"
            if fast_bf16(torch.device("cpu"))
            else ("emulated, several times slower than fp32 (train.precision=auto picks fp32)")
        )
        facts.append(f"device cpu: {cores} cores, torch uses {torch.get_num_threads()} threads; bf16 {bf16}")
        cxx = cpu_compiler()
        facts.append(f"train.compile on the CPU: C++ compiler {cxx}" if cxx else "train.compile: no C++ compiler")
        if cxx is None:
            warnings.append("no C++ compiler (g++, or $CXX): train.compile=true cannot run on the CPU")
        if torch.version.cuda is not None:
            warnings.append(
                "torch is a CUDA build but no GPU is visible: the CPU build (pip install torch "
                "--index-url <the CPU wheel index>) is several GB smaller"
            )
        if platform.system() == "Linux" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            warnings.append(
                "CPU training on glibc keeps freed activation memory (resident peak up to ~1.5x); "
                "export MALLOC_MMAP_THRESHOLD_=131072 to give it back"
            )
    mem = _meminfo()
    if mem:
        facts.append(
            f"memory: {mem.get('MemAvailable', 0) / 2**30:.1f} GiB available of "
            f"{mem.get('MemTotal', 0) / 2**30:.1f} GiB"
        )
        if mem.get("MemAvailable", 1 << 40) < 4 * 2**30:
            warnings.append("less than 4 GiB of memory available: use the tiny presets or LoRA")
    disk = shutil.disk_usage(where)
    facts.append(f"disk: {disk.free / 2**30:.1f} GiB free at {Path(where).resolve()}")
    if disk.free < 5 * 2**30:
        warnings.append("less than 5 GiB of disk free: checkpoints (train.keep_checkpoints) may not fit")
    present = []
    for name in OPTIONAL:
        try:
            present.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            present.append(f"{name} -")
    facts.append("optional packages: " + ", ".join(present))
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > cores:
        warnings.append(f"OMP_NUM_THREADS={threads} is more than the {cores} cores: threads will contend")
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        warnings.append("CUDA_VISIBLE_DEVICES is set but empty: every GPU is hidden")
    if "WORLD_SIZE" in os.environ and "RANK" not in os.environ:
        warnings.append("WORLD_SIZE is set without RANK: launch distributed runs with torchrun")
    return facts, warnings


def main() -> int:
    facts, warnings = report()
    for f in facts:
        print(f)
    for w in warnings:
        print(f"warning: {w}")
    if not warnings:
        print("no common misconfiguration found")
    return 0
