"""QLoRA on a model whose fp32 weights do not fit this machine: Llama-3-8B's shape (random weights, bf16 on disk,
16 GB) fine-tuned by `llmstages sft` with `peft.quantize_base=nf4`, its resident peak measured in the run's own
process and set beside `llmstages estimate-memory`'s figures for QLoRA and for bf16 LoRA.

    python benchmarks/qlora_large.py [--dir DIR] [--shape llama3_8b] [--steps 2] [--batch-size 2] [--seq-len 256]
                                     [--checkpointing] [--precision bf16] [--glibc-default]

DIR keeps the generated model between runs (default: a temporary folder, removed after). The model is written
tensor by tensor with `store.hf.write_safetensors`; it needs the model's bf16 bytes of disk, and as much again for
the run's final/. The run: LoRA rank 16 (alpha 32) on every linear
layer of the blocks, `--steps` optimizer steps of `--batch-size` rows of `--seq-len` tokens on a small SFT file
(one held-out example, no generated evaluation), then `final/` written (the base read back from DIR tensor by
tensor). Loading quantizes each linear weight as it is read (`store.load_model(quantize_base="nf4")`), so the
model is never whole in fp32 or bf16.

What is measured: the run's resident high-water mark (VmHWM: loading, training, saving), also above the
interpreter's own with llmstages imported (what `estimate-memory` estimates), and its wall time; the steps'
tokens/s from its metrics. The run has MALLOC_MMAP_THRESHOLD_=131072, as `estimate-memory --measure` does (glibc's
default keeps freed activations in its heap; `--glibc-default` shows that peak).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

CHILD = """import sys
import llmstages.stages.sft
from llmstages.cli import main
base = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
print("BASE_KIB", base)
rc = main(sys.argv[1:])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("VMHWM_KIB", hwm)
sys.exit(rc)
"""


def write_model(shape: str, path: Path) -> None:
    """Our model directory with the shape's config, weights N(0, 0.02) (norms 1) in bf16, and a small BPE
    tokenizer (fewer tokens than the model's vocabulary, which the stages allow)."""
    from llmstages.data.builtin import builtin_corpus
    from llmstages.data.tokenizer import train_bpe
    from llmstages.model import GPT, preset
    from llmstages.store.hf import Deferred, write_safetensors
    from llmstages.store.io import FORMAT_KEY

    cfg = preset(shape)
    with torch.device("meta"):
        sd = GPT(cfg).state_dict()
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    g = torch.Generator().manual_seed(0)

    def make(shape_: torch.Size, norm: bool) -> torch.Tensor:
        if norm:
            return torch.ones(shape_, dtype=torch.bfloat16)
        return torch.randn(shape_, generator=g).mul_(0.02).bfloat16()

    tensors = {k: Deferred(tuple(v.shape), torch.bfloat16, _maker(make, v.shape, v.dim() == 1)) for k, v in sd.items()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps({FORMAT_KEY: 1, **cfg.to_dict()}, indent=2) + "\n")
    train_bpe(builtin_corpus(0, 0.2), 600).save(tmp)
    write_safetensors(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
    tmp.rename(path)


def _maker(make, shape: torch.Size, norm: bool):  # noqa: ANN001, ANN202
    return lambda: make(shape, norm)


def estimate(shape: str, method: str, precision: str, batch: int, seq: int, checkpointing: bool) -> float:
    """`llmstages estimate-memory`'s total (GiB) for the run."""
    from llmstages.model import preset
    from llmstages.train.memory import estimate

    est = estimate(
        preset(shape), method=method, precision=precision, batch=batch, seq=seq, checkpointing=checkpointing,
        lora_rank=16, lora_targets=["all-linear"], device="cpu",
    )  # fmt: skip
    return est.total / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="where the generated model is kept between runs (default: a temporary folder)")
    ap.add_argument("--shape", default="llama3_8b")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--glibc-default", action="store_true", help="without MALLOC_MMAP_THRESHOLD_=131072")
    a = ap.parse_args()
    with contextlib.ExitStack() as stack:
        where = Path(a.dir) if a.dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        model = where / a.shape
        if not model.is_dir():
            t0 = time.perf_counter()
            write_model(a.shape, model)
            print(f"wrote {model} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        run(a, model)


def run(a: argparse.Namespace, model: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            {"instruction": f"Say the number {i} in words.", "output": f"The number is {i}. " * 40} for i in range(64)
        ]
        (Path(tmp) / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (Path(tmp) / "val.jsonl").write_text(json.dumps(rows[0]) + "\n")
        out = Path(tmp) / "run"
        args = [
            "sft", f"model.path={model}", f"out_dir={out}", f"data.path=[{Path(tmp) / 'train.jsonl'}]",
            f"data.val_path=[{Path(tmp) / 'val.jsonl'}]", "data.max_eval_examples=0", "peft.method=lora",
            "peft.quantize_base=nf4", "peft.target_modules=[all-linear]", "peft.rank=16", "peft.alpha=32",
            f"train.precision={a.precision}", f"train.max_steps={a.steps}", f"train.batch_size={a.batch_size}",
            f"train.seq_len={a.seq_len}", "train.warmup_steps=0", "train.log_every=1", "train.eval_every=100000",
            "train.save_every=100000", f"train.activation_checkpointing={str(a.checkpointing).lower()}",
        ]  # fmt: skip
        t0 = time.perf_counter()
        env = dict(os.environ)
        if not a.glibc_default:  # as `estimate-memory --measure` runs (train/memory.py says why)
            env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        r = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(f"the run failed:\n{r.stderr[-3000:]}")
        kib = {line.split()[0]: int(line.split()[1]) * 1024 for line in r.stdout.splitlines() if "_KIB " in line}
        hwm, base = kib["VMHWM_KIB"], kib["BASE_KIB"]
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        tok_s = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
        final = sorted(p.name for p in (out / "final").iterdir())
    qlora = estimate(a.shape, "qlora", a.precision, a.batch_size, a.seq_len, a.checkpointing)
    lora = estimate(a.shape, "lora", a.precision, a.batch_size, a.seq_len, a.checkpointing)
    above = (hwm - base) / 2**30
    print(f"# QLoRA at the {a.shape} shape, {a.precision}; {machine()}")
    print(f"# llmstages sft, LoRA r16 on every linear layer over an NF4 base, {a.steps} steps of {a.batch_size} x "
          f"{a.seq_len} tokens, activation checkpointing {a.checkpointing}, MALLOC_MMAP_THRESHOLD_ "
          f"{'default' if a.glibc_default else '131072'}; final/: {', '.join(final)}")  # fmt: skip
    print(
        "| resident peak | above the interpreter | estimate-memory QLoRA | measured / estimate | estimate-memory "
        "bf16 LoRA | measured QLoRA / estimated bf16 LoRA | tokens/s of the steps | run |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {hwm / 2**30:.2f} GiB | {above:.2f} GiB | {qlora:.2f} GiB | {above / qlora:.2f} | {lora:.2f} GiB | "
        f"{above / lora:.2f}x | {', '.join(f'{t:.1f}' for t in tok_s)} | {wall:.0f} s |"
    )


if __name__ == "__main__":
    main()
