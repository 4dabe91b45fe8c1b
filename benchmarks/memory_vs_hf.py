"""Peak memory and speed of LoRA, QLoRA and full fine-tuning with 8-bit AdamW: ours against transformers + peft
(+ bitsandbytes for QLoRA and 8-bit AdamW).

    python benchmarks/memory_vs_hf.py [--shapes smollm2_360m,qwen2_5_0_5b] [--rounds 2] [--steps 2]
                                      [--only ours-lora,hf-qlora,...] [--precision auto|fp32|bf16]
                                      [--checkpointing]

Each shape is a transformers model built from the published config (`smollm2_360m`: Llama, 32 blocks, d=960;
`qwen2_5_0_5b`: Qwen2, 24 blocks, d=896, a 151,936-token vocabulary, tied embeddings) with random weights, saved
in fp32; both sides load those weights. One training step: 2 rows x 256 tokens, next-token loss on every token,
AdamW at 1e-4; LoRA rank 16 (alpha 32) on every linear layer of the blocks.

- ours-lora / hf-lora: LoRA; under bf16 ours holds the frozen linear weights in bf16 (as its stages do), the
  reference runs autocast over its fp32 weights (as `transformers.Trainer(bf16=True)` does).
- ours-qlora: `peft.quantize_base: nf4`, the blocks' linear weights in NF4 with double-quantized scales
  (peft/nf4.py), and under bf16 the token embedding and output head in bf16 (train/frozen.py). hf-qlora:
  `BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype)` + peft, without
  `prepare_model_for_kbit_training` (which would cast the rest to fp32: the reference as lean as it gets).
- ours-full / ours-full8 / ours-full4: full fine-tuning with AdamW / with `train.optimizer: adamw8bit` /
  `adamw4bit` (train/adamw8bit.py); hf-full8: transformers with bitsandbytes' AdamW8bit.

Every (shape, contender) runs in a fresh subprocess, the contenders alternating round by round. Memory is the
resident high-water mark over the interpreter's own before the model is loaded: "train" from after setup
(model loaded, adapters applied, optimizer built; the mark restarted there), "all" including loading. Tokens/s:
median over the timed steps of every round (one warm-up step each). The table prints the machine and versions.
Targets at qwen2_5_0_5b: ours-qlora train peak <= 0.45x ours-lora and <= 0.8x hf-qlora; ours-qlora speed >= 0.6x
ours-lora; ours-full8 train peak <= 0.7x ours-full.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import current_rss_mib, machine, median, peak_rss_mib  # noqa: E402

ROWS, SEQ = 2, 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTENDERS = ("ours-lora", "hf-lora", "ours-qlora", "hf-qlora", "ours-full", "ours-full8", "ours-full4", "hf-full8")


def save_reference(shape: str, path: Path) -> Path:
    """A transformers model with the shape's published config and random weights (fp32), saved to `path`."""
    import transformers as tf

    from llmstages.model import preset

    tf.logging.set_verbosity_error()
    c = preset(shape)
    common = dict(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                  num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                  max_position_embeddings=c.block_size, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
                  tie_word_embeddings=c.tie_embeddings, bos_token_id=1, eos_token_id=2)  # fmt: skip
    cfg = tf.Qwen2Config(**common) if c.qkv_bias else tf.LlamaConfig(**common)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    return path


def reset_high_water() -> None:
    gc.collect()
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def setup(contender: str, path: str, precision: str, checkpointing: bool = False):
    """(model, optimizer, loss(batch)) of a contender; `checkpointing`: activation checkpointing of every block
    (ours: `train.activation_checkpointing`; transformers: `gradient_checkpointing_enable`, non-reentrant)."""
    side, method = contender.split("-")
    if side == "ours":
        from llmstages import losses as L
        from llmstages.config import TrainArgs
        from llmstages.peft import apply_peft
        from llmstages.store import load_model
        from llmstages.train.frozen import hold_frozen
        from llmstages.train.optim import build_optimizer

        # QLoRA: each linear weight of the blocks quantized as it is read, as the stages load it
        model = load_model(path, quantize_base="nf4" if method == "qlora" else "none").train()
        if method in ("lora", "qlora"):
            apply_peft(model, "lora", target_modules=TARGETS, rank=16, alpha=32, dropout=0.0)
            hold_frozen(model, precision)  # as train/prepare.py does (QLoRA: the embedding and head too)
        if checkpointing:
            from llmstages.train.prepare import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        optimizer = {"full8": "adamw8bit", "full4": "adamw4bit"}.get(method, "adamw")
        opt = build_optimizer(model, TrainArgs(lr=1e-4, optimizer=optimizer))

        def loss(ids: torch.Tensor) -> torch.Tensor:
            batch = {"input_ids": ids, "targets": L.shift_labels(ids)}
            return L.lm_loss(model, batch)[0] / L.count_targets(batch)

        return model, opt, loss
    import transformers as tf

    tf.logging.set_verbosity_error()
    kw = {}
    if method == "qlora":
        kw["quantization_config"] = tf.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        )
    model = tf.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kw).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method in ("lora", "qlora"):
        import peft

        cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
        model = peft.get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "full8":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)

    def loss(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    return model, opt, loss


def child(contender: str, path: str, precision: str, steps: int, checkpointing: bool = False) -> dict:
    torch.manual_seed(0)
    base = current_rss_mib()
    model, opt, loss_of = setup(contender, path, precision, checkpointing)
    load_peak = peak_rss_mib() - base
    reset_high_water()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))
    cast = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with cast:
            loss = loss_of(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"train_mib": peak_rss_mib() - base, "load_mib": load_peak, "step_s": times[1:]}


def run_child(contender: str, path: Path, precision: str, steps: int, checkpointing: bool = False) -> dict | str:
    env_cmd = [sys.executable, __file__, "--child", contender, "--path", str(path), "--precision", precision,
               "--steps", str(steps), *(["--checkpointing"] if checkpointing else [])]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(env_cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or ["failed"])[-1][:160]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def versions() -> str:
    import importlib.metadata as md

    names = ("transformers", "peft", "bitsandbytes")
    return ", ".join(f"{n} {md.version(n)}" for n in names if _installed(n))


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="smollm2_360m,qwen2_5_0_5b")
    ap.add_argument("--only", default=",".join(CONTENDERS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on every side")
    ap.add_argument("--child")
    ap.add_argument("--path")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.precision, args.steps, args.checkpointing)))
        return
    from llmstages.train.start import fast_bf16

    precision = ("bf16" if fast_bf16(torch.device("cpu")) else "fp32") if args.precision == "auto" else args.precision
    contenders = [c for c in args.only.split(",") if c]
    ckpt = "; activation checkpointing" if args.checkpointing else ""
    print(f"# {machine()}; {versions()}; {precision}; {ROWS} x {SEQ} tokens a step; rounds {args.rounds}{ckpt}")
    header = "| shape | contender | train peak MiB | with loading MiB | tokens/s | train peak / ours-lora |"
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = save_reference(shape, Path(tmp) / shape)
            results: dict[str, list] = {c: [] for c in contenders}
            for r in range(args.rounds):
                for c in contenders if r % 2 == 0 else contenders[::-1]:
                    results[c].append(run_child(c, path, precision, args.steps, args.checkpointing))
            print(f"\n{header}\n|---|---|---|---|---|---|")
            rows = {}
            for c, outs in results.items():
                ok = [o for o in outs if isinstance(o, dict)]
                if not ok:
                    print(f"| {shape} | {c} | did not run: {outs[0]} | | | |")
                    continue
                train = median([o["train_mib"] for o in ok])
                steps = [s for o in ok for s in o["step_s"]]
                rows[c] = (train, ROWS * SEQ / median(steps))
                loading = median([max(o["train_mib"], o["load_mib"]) for o in ok])
                ratio = f"{train / rows['ours-lora'][0]:.2f}x" if "ours-lora" in rows else ""
                print(f"| {shape} | {c} | {train:,.0f} | {loading:,.0f} | {rows[c][1]:,.0f} | {ratio} |")
            for a, b, what in (("ours-qlora", "ours-lora", "QLoRA / LoRA (ours)"),
                               ("ours-qlora", "hf-qlora", "QLoRA ours / reference"),
                               ("ours-full8", "ours-full", "8-bit / fp32 AdamW (ours)"),
                               ("ours-full4", "ours-full", "4-bit / fp32 AdamW (ours)"),
                               ("ours-lora", "hf-lora", "LoRA ours / reference"),
                               ("ours-full8", "hf-full8", "8-bit AdamW ours / reference")):  # fmt: skip
                if a in rows and b in rows:
                    mem, speed = rows[a][0] / rows[b][0], rows[a][1] / rows[b][1]
                    print(f"- {shape}: {what}: train peak {mem:.2f}x, tokens/s {speed:.2f}x")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
