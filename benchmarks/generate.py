"""Cached generation on a real shape: ours against transformers' `generate`, same weights, in one process.

    python benchmarks/generate.py [--shape smollm2_135m] [--rounds 3] [--batches 1 8 32 64] [--only decode|rollout]

The model has the preset's shape (random weights, written once as a transformers directory and loaded by both).
Two tables, each timed alternately (A B A B ...) with medians, in fp32 and, where the CPU or GPU has bf16
natively, with the weights in bf16 (both sides):

- decode: greedy, 64-token prompts, 64 new tokens, at each batch size; new tokens/s and the ratio ours/HF. Greedy
  decoding of the same fp32 weights must agree, so the tokens are compared too.
- rollout: what one GRPO step samples: 4 prompts x 8 replies, 128 new tokens at temperature 1 (no EOS, so every
  side generates the same number of tokens). TRL's GRPOTrainer without vLLM calls the model's `generate` on each
  prompt repeated once per reply, so "HF" is that call; ours runs with the shared prefill (each prompt prefilled
  once, its keys and values copied to its 8 rows) and without it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine, median  # noqa: E402

from llmstages.model import GPT, export_hf, generate, load_model, preset  # noqa: E402
from llmstages.train.loop import resolve_precision  # noqa: E402

PROMPT, NEW = 64, 64
ROLLOUT_PROMPTS, GROUP, ROLLOUT_NEW = 4, 8, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="smollm2_135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--only", choices=["decode", "rollout"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    import transformers as tf

    tf.logging.set_verbosity_error()
    dtypes = [torch.float32]
    if resolve_precision("auto", torch.device(a.device)) == "bf16":
        dtypes.append(torch.bfloat16)
    print(f"# generate: {a.shape} shape, random weights; {machine()}; {a.rounds} rounds, medians\n")
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        export_hf(GPT(preset(a.shape)), d)
        models = {
            dt: (
                load_model(d, dtype=dt, device=a.device).eval(),
                tf.AutoModelForCausalLM.from_pretrained(d, dtype=dt).to(a.device).eval(),
            )  # fmt: skip
            for dt in dtypes
        }
    vocab = models[torch.float32][0].config.vocab_size
    if a.only != "rollout":
        print(f"## decode: greedy, {PROMPT}-token prompts, {NEW} new tokens\n")
        print("| weights | batch | ours new tok/s | HF new tok/s | ratio ours/HF | same tokens |")
        print("|---|---|---|---|---|---|")
        for dt, (ours, hf) in models.items():
            for batch in a.batches:
                decode(ours, hf, batch, vocab, a.rounds, dt)
    if a.only != "decode":
        print(f"\n## rollout: {ROLLOUT_PROMPTS} prompts x {GROUP} replies, {PROMPT}-token prompts, {ROLLOUT_NEW} new "
              "tokens, temperature 1\n")  # fmt: skip
        print("| weights | ours, shared prefill tok/s | ours, no sharing tok/s | HF (TRL's call) tok/s | "
              "ratio ours/HF |\n|---|---|---|---|---|")  # fmt: skip
        for dt, (ours, hf) in models.items():
            rollout(ours, hf, vocab, a.rounds, dt)


def _name(dt: torch.dtype) -> str:
    return "fp32" if dt == torch.float32 else "bf16"


def decode(ours: GPT, hf, batch: int, vocab: int, rounds: int, dt: torch.dtype) -> None:
    g = torch.Generator().manual_seed(batch)
    x = torch.randint(0, vocab, (batch, PROMPT), generator=g).to(next(ours.parameters()).device)
    out: dict[str, torch.Tensor] = {}

    def run_ours() -> None:
        out["ours"] = generate(ours, x, NEW, temperature=0.0).tokens

    @torch.no_grad()
    def run_hf() -> None:
        seq = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, pad_token_id=0)  # fmt: skip
        out["hf"] = seq[:, PROMPT:]

    t = alternate({"ours": run_ours, "hf": run_hf}, rounds)
    tps = {k: batch * NEW / median(v) for k, v in t.items()}
    same = torch.equal(out["ours"], out["hf"]) if dt == torch.float32 else "-"
    print(f"| {_name(dt)} | {batch} | {tps['ours']:.1f} | {tps['hf']:.1f} | {tps['ours'] / tps['hf']:.2f} | "
          f"{same} |", flush=True)  # fmt: skip


def rollout(ours: GPT, hf, vocab: int, rounds: int, dt: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (ROLLOUT_PROMPTS, PROMPT), generator=g)
    x = prompts.repeat_interleave(GROUP, 0).to(next(ours.parameters()).device)
    gen = torch.Generator(device=x.device)

    def run(share: bool):
        def fn() -> None:
            gen.manual_seed(1)
            generate(ours, x, ROLLOUT_NEW, temperature=1.0, share_prompts=share, generator=gen)

        return fn

    @torch.no_grad()
    def run_hf() -> None:
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=ROLLOUT_NEW, min_new_tokens=ROLLOUT_NEW,
                    do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)  # fmt: skip

    t = alternate({"shared": run(True), "plain": run(False), "hf": run_hf}, rounds)
    tps = {k: x.size(0) * ROLLOUT_NEW / median(v) for k, v in t.items()}
    print(f"| {_name(dt)} | {tps['shared']:.1f} | {tps['plain']:.1f} | {tps['hf']:.1f} | "
          f"{tps['shared'] / tps['hf']:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
