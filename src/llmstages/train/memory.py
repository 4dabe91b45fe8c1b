"""How much memory a training run needs per process, before it runs, and what to change when it does not fit.

    llmstages estimate-memory --model llama3_8b --method lora --strategy fsdp --world-size 8 --precision bf16 \\
        --batch-size 4 --seq-len 2048 --activation-checkpointing [--memory 80GiB] [--measure]

Per rank, in bytes (P parameters, T of them trained, N data-parallel ranks, fp32 master weights throughout as
the loop keeps them; bf16/fp16 autocast only changes what the activations are stored in):

    parameters   4 P          (fsdp: 4 P / N plus the gathered block(s) in flight; tp and pp: their share)
                 LoRA under bf16/fp16 holds the frozen weights in 2 bytes (train/frozen.py); QLoRA holds the
                 blocks' linear weights in NF4, 0.5 + 1/64 + 4/(64 x 256) bytes each (peft/nf4.py), and
                 dequantizes one of them at a time (two fp32 working copies of the largest); under bf16/fp16
                 its token embedding and output head are held in 2 bytes too
    gradients    4 T          (ddp and zero1 also keep DDP's communication buckets, another 4 T; fsdp: / N)
    optimizer    8 T          (AdamW's two moments; zero1 and fsdp: / N); adamw8bit: 2 (1 + 4/256) bytes a
                 value of each tensor of >= 4096 values (adamw4bit: 2 (1/2 + 4/128)), 8 for the rest, plus
                 its fp32 working copies of up to 4M values (train/adamw8bit.py)
    activations  B S L (7 d + 2 d_kv + 4 d_ff) a    saved for the backward by each block: the norms' inputs and
                 outputs, q (after RoPE), k, v, the attention output and its copy; the MLP's gate, its SiLU,
                 up and their product (a = 4 bytes fp32, 2 bf16; the norms' 4 d stay fp32 under autocast, as
                 the residual stream does). Activation checkpointing keeps B S d a per block plus one block's
                 worth; the LM head's chunked cross-entropy adds B S d a x 3 and its chunk of logits,
                 min(B S, c) V x 4 bytes x 2 (2.5 under bf16/fp16: the product comes out in half first), with
                 c = 512 rows or fewer for a large vocabulary (losses.chunk_rows: at most 2^25 logits);
                 under bf16/fp16 an fp32 head (not QLoRA's, held in half) is copied to half once per loss
                 call, V d x 2 bytes.
    total        parameters + optimizer + runtime + the larger of gradients and activations: the backward
                 frees a block's activations as it writes that block's gradients, so the two do not peak
                 together (DDP's buckets are held throughout and counted in full).
    runtime      what the framework itself holds once training runs (kernels' workspaces, the autograd engine;
                 measured ~90 MiB on a CPU, ~32 MiB more under bf16/fp16 and ~16 MiB more in fp32 through
                 oneDNN (matmul.py); a CUDA context ~0.5 GiB).

`--measure` runs a few training steps of that configuration on this machine's CPU (one process) in a fresh
interpreter and reports the resident-memory peak above the interpreter's own, next to the estimate. It runs with
MALLOC_MMAP_THRESHOLD_=131072: glibc's default raises that threshold as large blocks are freed and then keeps
freed activation memory in its heap, so a default CPU run's resident peak is up to ~1.5x the live tensors
(measured here: 1.56 GiB resident for 1.08 GiB live). Set the same variable for CPU training runs to get it back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from llmstages.errors import UserError
from llmstages.losses import chunk_rows
from llmstages.matmul import fp32_through_onednn
from llmstages.model.gpt import ModelConfig, count_params
from llmstages.model.presets import PRESETS, preset
from llmstages.store import load_config
from llmstages.train.adamw8bit import LOW_BIT

STRATEGIES = ("none", "ddp", "zero1", "fsdp", "fsdp-zero2", "tp", "pp")
RUNTIME = {"cpu": 90 * 2**20, "cuda": 512 * 2**20}
HALF_CPU_RUNTIME = 32 * 2**20  # what bf16/fp16 kernels add on a CPU (measured with --measure: 26-45 MiB)
ONEDNN_FP32_RUNTIME = 16 * 2**20  # oneDNN's fp32 kernels, where matmul.py sends fp32 products (measured: 9-19 MiB)
ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", *LOW_BIT)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # a 4-bit code, an int8 scale per 64, an fp32 factor per 256 scales


@dataclass
class Estimate:
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    runtime: float
    trainable: int
    total_parameters: int
    buckets: float = 0.0

    @property
    def total(self) -> float:
        """See the module docstring: gradients and activations do not peak together."""
        return self.parameters + self.optimizer + self.runtime + self.buckets + max(self.gradients, self.activations)


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of a block."""
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}
    if cfg.mlp == "swiglu":
        shapes["gate_proj"] = (d, cfg.d_ff)
    return {**shapes, "up_proj": (d, cfg.d_ff), "down_proj": (cfg.d_ff, d)}


def lora_parameters(cfg: ModelConfig, rank: int, targets: list[str]) -> int:
    """Trainable LoRA parameters: rank x (in + out features) of every targeted projection in every block."""
    shapes = linear_shapes(cfg)
    if targets == ["all-linear"]:
        targets = list(shapes)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        names = ", ".join(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        raise UserError(f"--lora-targets: unknown module '{unknown[0]}' (choose from {names})")
    return cfg.n_layers * sum(rank * sum(shapes[t]) for t in targets)


def optimizer_bytes(cfg: ModelConfig, method: str, trained: int, optimizer: str) -> float:
    """The optimizer state of `trained` values: AdamW's 8 bytes each, or adamw8bit's / adamw4bit's (see the module
    docstring; LoRA's matrices and the blocks' weights are its quantized tensors, the norms keep fp32 moments)."""
    if optimizer == "adamw":
        return 8.0 * trained
    small = (2 * cfg.n_layers + 1) * cfg.d_model * (2 if cfg.norm == "layernorm" else 1) if method == "full" else 0
    largest = cfg.vocab_size * cfg.d_model if method == "full" else 0
    work = 6 * 4.0 * min(max(largest, max(a * b for a, b in linear_shapes(cfg).values())), 1 << 22)
    return LOW_BIT[optimizer].state_bytes() * (trained - small) + 8.0 * small + work


def activation_bytes(cfg: ModelConfig, batch: int, seq: int, precision: str, checkpointing: bool) -> float:
    """Bytes the forward keeps for the backward (see the module docstring)."""
    a = ACT_BYTES[precision]
    tokens = batch * seq
    d_kv = cfg.n_kv_heads * cfg.head_dim
    per_block = tokens * (4 * cfg.d_model * 4 + (3 * cfg.d_model + 2 * d_kv + 4 * cfg.d_ff) * a)
    logits = min(tokens, chunk_rows(cfg.vocab_size)) * cfg.vocab_size
    head = tokens * cfg.d_model * a * 3 + logits * 4 * (2.0 if a == 4 else 2.5)
    if checkpointing:
        return cfg.n_layers * tokens * cfg.d_model * a + per_block + head
    return cfg.n_layers * per_block + head


def estimate(
    cfg: ModelConfig,
    method: str = "full",
    strategy: str = "none",
    world: int = 1,
    precision: str = "fp32",
    batch: int = 1,
    seq: int | None = None,
    checkpointing: bool = False,
    lora_rank: int = 8,
    lora_targets: list[str] | None = None,
    device: str = "cuda",
    optimizer: str = "adamw",
) -> Estimate:
    """Per-rank memory of a training step (bytes): see the module docstring for the terms."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}, got '{strategy}'")
    if method not in METHODS:
        raise UserError(f"--method must be full, lora or qlora, got '{method}'")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer must be adamw, adamw8bit or adamw4bit, got '{optimizer}'")
    if (method == "qlora" or optimizer != "adamw") and strategy not in ("none", "ddp", "zero1"):
        raise UserError(f"--method {method} with --optimizer {optimizer} runs under none, ddp or zero1")
    if precision not in ACT_BYTES:
        raise UserError(f"--precision must be fp32, bf16 or fp16, got '{precision}'")
    if world < 1 or batch < 1:
        raise UserError("--world-size and --batch-size must be at least 1")
    seq = seq or cfg.block_size
    P = count_params(cfg)
    T = P if method == "full" else lora_parameters(cfg, lora_rank, lora_targets or ["q_proj", "v_proj"])
    body = count_params(cfg, embeddings=False)
    block = (body - cfg.d_model) / cfg.n_layers
    params = 4.0 * P + (4.0 * (T if method != "full" else 0))
    grads, opt = 4.0 * T, optimizer_bytes(cfg, method, T, optimizer)
    linear = cfg.n_layers * sum(a * b for a, b in linear_shapes(cfg).values())
    if method == "qlora":
        largest = max(a * b for a, b in linear_shapes(cfg).values())
        params += (NF4_BYTES - 4.0) * linear + 2 * 4.0 * largest
        if precision != "fp32":  # the token embedding and output head held in the compute dtype too
            params -= 2.0 * cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    elif method == "lora" and precision != "fp32" and strategy in ("none", "ddp", "zero1"):
        params -= 2.0 * linear  # the frozen linear weights held in the compute dtype
    acts = activation_bytes(cfg, batch, seq, precision, checkpointing)
    if precision != "fp32" and method != "qlora":  # the fused loss's copy of the fp32 head in the compute dtype
        acts += 2.0 * cfg.vocab_size * cfg.d_model
    n = world
    buckets = 0.0
    if strategy in ("ddp", "zero1"):
        buckets = 4.0 * T  # DDP's buckets
        if strategy == "zero1":
            opt /= n
    elif strategy == "fsdp":  # ZeRO-3: shards, plus the gathered block in use and the one prefetched
        params = params / n + 2 * 4.0 * block
        grads, opt = grads / n, opt / n
    elif strategy == "fsdp-zero2":  # parameters stay gathered from forward to backward
        grads, opt = grads / n, opt / n
    elif strategy == "tp":
        shard = (P - body) + body / n
        params = 4.0 * shard
        if method == "full":
            grads, opt = 4.0 * shard, 8.0 * shard
        acts = acts * (0.5 + 0.5 / n)  # the projections' outputs split over ranks, the norms' do not
    elif strategy == "pp":
        params, grads, opt = params / n, grads / n, opt / n
        acts = acts / n * min(n, 2)  # 1F1B keeps up to the pipeline depth of micro-batches in flight
    if device not in RUNTIME:
        raise UserError(f"--device must be cpu or cuda, got '{device}'")
    runtime = RUNTIME[device]
    if device == "cpu":
        runtime += HALF_CPU_RUNTIME if precision != "fp32" else ONEDNN_FP32_RUNTIME if fp32_through_onednn() else 0
    return Estimate(params, grads, opt, acts, runtime, int(T), int(P), buckets)


def device_memory(device: str | object) -> float | None:
    """Bytes of memory on the device: the GPU's total, or the machine's physical memory for a CPU (None where
    unknown)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return float(torch.cuda.get_device_properties(dev).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_fits(cfg: ModelConfig, batch: int, seq: int, precision: str, checkpointing: bool, device) -> None:
    """Refuse (before anything is written) a micro-batch whose activations alone exceed the device's memory:
    `train.batch_size=1e12` failed deep inside the first step, after the run folder was written."""
    memory = device_memory(device)
    need = activation_bytes(cfg, batch, seq, precision if precision in ACT_BYTES else "fp32", checkpointing)
    if memory is not None and need > memory:
        raise UserError(
            f"train.batch_size={batch} with train.seq_len={seq}: one micro-batch keeps about {gib(need)} of "
            f"activations, more than the device's {gib(memory)}; lower train.batch_size (and raise train.grad_accum "
            "to keep the global batch)"
        )


def largest_batch(cfg: ModelConfig, memory: float, **kw) -> int:
    """The largest batch size whose estimate fits in `memory` bytes (0 if none does)."""
    lo, hi = 0, 1
    while hi <= 1 << 20 and estimate(cfg, batch=hi, **kw).total <= memory:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate(cfg, batch=mid, **kw).total <= memory else (lo, mid)
    return lo


def parse_size(text: str) -> float:
    """'16GiB', '512MB', '80G' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"--memory must look like 16GiB or 512MB, got '{text}'")
    unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return float(m.group(1)) * unit


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def report(e: Estimate, title: str) -> str:
    rows = [
        ("parameters", e.parameters),
        ("gradients", e.gradients + e.buckets),
        ("optimizer state", e.optimizer),
        ("activations", e.activations),
        ("runtime", e.runtime),
        ("total per rank", e.total),
    ]
    lines = [title, f"  {e.total_parameters:,} parameters, {e.trainable:,} trained"]
    lines += [f"  {name:<16} {gib(v):>12}" for name, v in rows]
    return "\n".join(lines)


def measure(
    cfg: ModelConfig,
    method: str,
    precision: str,
    batch: int,
    seq: int,
    checkpointing: bool,
    lora_rank: int = 8,
    lora_targets: list[str] | None = None,
    optimizer: str = "adamw",
) -> float:
    """Peak resident memory (bytes) of 3 training steps on this CPU, above a fresh interpreter's own: the model as
    it trains (QLoRA: quantized; bf16 LoRA: its frozen weights in bf16) plus what the steps add."""
    targets = lora_targets or ["q_proj", "v_proj"]
    spec = dict(
        config=cfg.to_dict(),
        method=method,
        precision=precision,
        batch=batch,
        seq=seq,
        checkpointing=checkpointing,
        lora_rank=lora_rank,
        lora_targets=targets,
        optimizer=optimizer,
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    cmd = [sys.executable, "-m", "llmstages.train.memory_probe", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"measurement failed: {r.stderr[-2000:]}")
    return float(json.loads(r.stdout.strip().splitlines()[-1])["peak"])


def out_of_memory_advice(
    cfg: ModelConfig,
    method: str,
    strategy: str,
    world: int,
    precision: str,
    batch: int,
    seq: int,
    checkpointing: bool,
    grad_accum: int,
    device: str = "cuda",
    optimizer: str = "adamw",
) -> str:
    """The one-line message for a run that ran out of memory: the estimate and settings that need less."""
    strategy = strategy if strategy in STRATEGIES else "none"
    e = estimate(cfg, method, strategy, world, precision, batch, seq, checkpointing, device=device, optimizer=optimizer)
    tips = []
    if batch > 1:
        tips.append(f"train.batch_size={max(1, batch // 2)} train.grad_accum={grad_accum * 2} (same global batch)")
    if not checkpointing:
        kw = dict(device=device, optimizer=optimizer)
        saved = e.activations - estimate(cfg, method, strategy, world, precision, batch, seq, True, **kw).activations
        tips.append(f"train.activation_checkpointing=true (saves ~{gib(saved)})")
    if strategy in ("none", "ddp") and world > 1:
        tips.append("dist.strategy=fsdp (shards parameters, gradients and optimizer state)")
    if method == "full":
        tips.append("peft.method=lora")
        if optimizer == "adamw":
            tips.append("train.optimizer=adamw8bit (8-bit optimizer state)")
    if method == "lora" and strategy in ("none", "ddp", "zero1"):
        tips.append("peft.quantize_base=nf4 (QLoRA: the frozen base in 4 bits)")
    return (
        f"out of memory: this step needs about {gib(e.total)} per process (parameters {gib(e.parameters)}, "
        f"gradients {gib(e.gradients)}, optimizer {gib(e.optimizer)}, activations {gib(e.activations)}); try "
        + "; or ".join(tips)
    )


def estimate_run(
    model: str,
    method: str = "full",
    strategy: str = "none",
    world_size: int = 1,
    precision: str = "fp32",
    batch_size: int = 1,
    seq_len: int | None = None,
    checkpointing: bool = False,
    lora_rank: int = 8,
    lora_targets: list[str] | None = None,
    device: str = "cuda",
    budget_text: str | None = None,
    measure_too: bool = False,
    optimizer: str = "adamw",
) -> None:
    """`llmstages estimate-memory`: print the estimate for `model` (a preset or a model directory); with
    `budget_text` (e.g. 80GiB) the largest batch that fits, with `measure_too` the peak measured on this CPU."""
    if seq_len is not None and seq_len < 1:
        raise UserError(f"--seq-len must be at least 1, got {seq_len}")
    if lora_rank < 1:
        raise UserError(f"--lora-rank must be at least 1, got {lora_rank}")
    if model in PRESETS:
        cfg = preset(model)
    elif Path(model).exists() or "/" in model:  # a folder, or a hub id in the local cache
        cfg = load_config(model)
    else:
        raise UserError(f"--model '{model}' is neither a preset ({', '.join(PRESETS)}) nor a model directory")
    seq = cfg.block_size if seq_len is None else seq_len
    kw = dict(
        method=method,
        strategy=strategy,
        world=world_size,
        precision=precision,
        seq=seq,
        checkpointing=checkpointing,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        device="cpu" if measure_too else device,
        optimizer=optimizer,
    )
    e = estimate(cfg, batch=batch_size, **kw)
    ckpt = ", activation checkpointing" if checkpointing else ""
    print(
        report(
            e,
            f"{model}: {method}, {optimizer}, {strategy} on {world_size} process(es), "
            f"{precision}, batch {batch_size} x {seq} tokens{ckpt}",
        )
    )
    if budget_text:
        budget = parse_size(budget_text)
        fits = largest_batch(cfg, budget, **kw)
        print(f"  largest batch in {gib(budget)}: {fits}" + ("" if fits else " (does not fit at batch 1)"))
    if measure_too:
        if strategy != "none" or world_size != 1:
            raise UserError("--measure runs one process: use --strategy none --world-size 1")
        m = measure(
            cfg,
            method,
            precision,
            batch_size,
            seq,
            checkpointing,
            lora_rank,
            lora_targets,
            optimizer,
        )
        print(f"  measured peak    {gib(m):>12}  (estimate / measured = {e.total / m:.2f})")
