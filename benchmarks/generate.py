"""Cached generation: ours vs Hugging Face `generate`, same weights, greedy, batch 8, 128 new tokens.

    python benchmarks/generate.py [--rounds 7] [--family llama|gpt2|both] [--device cpu|cuda]

Both run in this process, alternating; the output is new tokens/s (medians) and the ratio ours/HF. The tokens
themselves are compared too: greedy decoding of the same weights must agree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine, median  # noqa: E402
from train_step import SIZE, save_reference  # noqa: E402

from llmstages.model import generate, load_model  # noqa: E402

BATCH, PROMPT, NEW = 8, 32, 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--family", default="both", choices=["llama", "gpt2", "both"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"# generate: {SIZE['n_layers']} layers, d={SIZE['d_model']}, vocab {SIZE['vocab_size']}, batch {BATCH}, "
          f"prompt {PROMPT}, {NEW} new tokens, greedy, fp32, {machine()}; {args.rounds} rounds, medians")  # fmt: skip
    print("| family | ours new tok/s | HF new tok/s | ratio ours/HF | same tokens |")
    print("|---|---|---|---|---|")
    for family in ["llama", "gpt2"] if args.family == "both" else [args.family]:
        bench_family(family, args.device, args.rounds)


def bench_family(family: str, device: str, rounds: int) -> None:
    import transformers as tf

    with tempfile.TemporaryDirectory() as d:
        path = save_reference(family, d)
        hf = tf.AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        ours = load_model(path, device=device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, SIZE["vocab_size"], (BATCH, PROMPT), generator=g).to(device)
    out: dict[str, torch.Tensor] = {}

    def run_ours() -> None:
        out["ours"] = generate(ours, x, NEW, temperature=0.0).tokens

    def run_hf() -> None:
        with torch.no_grad():
            seq = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, pad_token_id=0)  # fmt: skip
        out["hf"] = seq[:, PROMPT:]

    t = alternate({"ours": run_ours, "hf": run_hf}, rounds)
    tps = {k: BATCH * NEW / median(v) for k, v in t.items()}
    same = torch.equal(out["ours"], out["hf"])
    print(f"| {family} | {tps['ours']:.0f} | {tps['hf']:.0f} | {tps['ours'] / tps['hf']:.2f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
