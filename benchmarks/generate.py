"""Cached generation on a real shape: ours against transformers' `generate`, same weights, in one process.

    python benchmarks/generate.py [--shape smollm2_135m] [--rounds 3] [--batches 1 8 32 64]
                                  [--only decode|rollout|lora|queue|cache]

The model has the preset's shape (random weights, written once as a transformers directory and loaded by both).
Two tables, each timed alternately (A B A B ...) with medians, in fp32 and, where the CPU or GPU has bf16
natively, with the weights in bf16 (both sides):

- decode: greedy, 64-token prompts, 64 new tokens, at each batch size; new tokens/s and the ratio ours/HF. Greedy
  decoding of the same fp32 weights must agree, so the tokens are compared too.
- rollout: what one GRPO step samples: 4 prompts x 8 replies, 128 new tokens at temperature 1 (no EOS, so every
  side generates the same number of tokens). TRL's GRPOTrainer without vLLM calls the model's `generate` on each
  prompt repeated once per reply, so "HF" is that call; ours runs with the shared prefill (each prompt prefilled
  once, its keys and values copied to its 8 rows) and without it.
- lora: the same rollout from a LoRA policy (rank 16 on every linear layer, B moved off zero), as GRPO samples it
  during training: ours with the adapters merged for sampling (`peft.merged_for_sampling`, fp32 only: in bf16
  the sum would be rounded) and with them apart, against transformers + peft's `generate` on the same adapter
  (TRL's call with a `peft_config`).
- queue: what an evaluation samples: 96 prompts of 16-64 tokens, greedy, up to 128 new tokens, each reply ending at
  its own EOS (one token id in 48 counts as EOS, so that replies of random weights end at varied lengths), 32
  rows at a time: ours with continuous batching (`generate_queue`: a finished row takes the next prompt), ours
  in fixed batches of 32 (a batch runs until its longest reply ends), and transformers' `generate` in the same
  fixed batches. Tokens/s counts the reply tokens (EOS included); the replies are compared in fp32.
- cache (bf16 on a CPU only): ours decoding as in `decode` with the KV cache kept in fp32 (what a CPU does since
  the cache holds what attention reads) against the cache kept in the weights' bf16 (cast by attention each step).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine, median  # noqa: E402

from llmstages.model import GPT, generate, preset  # noqa: E402
from llmstages.model.generate import generate_queue, left_pad  # noqa: E402
from llmstages.store import export_hf, load_model  # noqa: E402
from llmstages.train.start import resolve_precision  # noqa: E402

G = sys.modules["llmstages.model.generate"]  # the module (the package exports the function under its name)

PROMPT, NEW = 64, 64
ROLLOUT_PROMPTS, GROUP, ROLLOUT_NEW = 4, 8, 128
QUEUE_PROMPTS, QUEUE_SLOTS = 96, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="smollm2_135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--only", choices=["decode", "rollout", "lora", "queue", "cache"])
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
    if a.only in (None, "decode"):
        print(f"## decode: greedy, {PROMPT}-token prompts, {NEW} new tokens\n")
        print("| weights | batch | ours new tok/s | HF new tok/s | ratio ours/HF | same tokens |")
        print("|---|---|---|---|---|---|")
        for dt, (ours, hf) in models.items():
            for batch in a.batches:
                decode(ours, hf, batch, vocab, a.rounds, dt)
    if a.only in (None, "rollout"):
        print(f"\n## rollout: {ROLLOUT_PROMPTS} prompts x {GROUP} replies, {PROMPT}-token prompts, {ROLLOUT_NEW} new "
              "tokens, temperature 1\n")  # fmt: skip
        print("| weights | ours, shared prefill tok/s | ours, no sharing tok/s | HF (TRL's call) tok/s | "
              "ratio ours/HF |\n|---|---|---|---|---|")  # fmt: skip
        for dt, (ours, hf) in models.items():
            rollout(ours, hf, vocab, a.rounds, dt)
    if a.only in (None, "lora"):
        print(f"\n## LoRA policy rollout: rank 16 on every linear layer; {ROLLOUT_PROMPTS} prompts x {GROUP} replies, "
              f"{PROMPT}-token prompts, {ROLLOUT_NEW} new tokens, temperature 1, shared prefill\n")  # fmt: skip
        print("| weights | ours, merged tok/s | ours, adapters apart tok/s | HF + peft tok/s | ratio ours/HF |\n"
              "|---|---|---|---|---|")  # fmt: skip
        for dt, (ours, hf) in models.items():
            lora_rollout(ours, hf, vocab, a.rounds, dt)
    if a.only in (None, "queue"):
        print(f"\n## evaluation queue: {QUEUE_PROMPTS} prompts of 16-64 tokens, greedy, up to {ROLLOUT_NEW} new tokens "
              f"with EOS, {QUEUE_SLOTS} rows at a time\n")  # fmt: skip
        print("| weights | reply tokens (mean / max) | ours, continuous batching tok/s | ours, fixed batches tok/s | "
              "HF, fixed batches tok/s | ratio ours/HF | same replies |\n|---|---|---|---|---|---|---|")  # fmt: skip
        for dt, (ours, hf) in models.items():
            queue(ours, hf, vocab, a.rounds, dt)
    if a.only in (None, "cache") and torch.bfloat16 in models and a.device == "cpu":
        print(f"\n## KV cache dtype, bf16 weights on a CPU: greedy, {PROMPT}-token prompts, {NEW} new tokens\n")
        print("| batch | cache in fp32 tok/s | cache in bf16 tok/s | ratio |\n|---|---|---|---|")
        for batch in a.batches:
            cache_dtypes(models[torch.bfloat16][0], batch, vocab, a.rounds)


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


def cache_dtypes(ours: GPT, batch: int, vocab: int, rounds: int) -> None:
    g = torch.Generator().manual_seed(batch)
    x = torch.randint(0, vocab, (batch, PROMPT), generator=g)
    kept = G.cache_dtype

    def run(fn):
        def go() -> None:
            G.cache_dtype = fn
            try:
                generate(ours, x, NEW, temperature=0.0)
            finally:
                G.cache_dtype = kept

        return go

    t = alternate({"fp32": run(kept), "bf16": run(lambda t: t.dtype)}, rounds)
    tps = {k: batch * NEW / median(v) for k, v in t.items()}
    print(f"| {batch} | {tps['fp32']:.1f} | {tps['bf16']:.1f} | {tps['fp32'] / tps['bf16']:.2f} |", flush=True)


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


def lora_rollout(ours: GPT, hf, vocab: int, rounds: int, dt: torch.dtype) -> None:
    """The rollout from LoRA policies with equal adapter weights on both sides (ours copied into peft's)."""
    import copy

    import peft

    from llmstages.peft import apply_lora, merged_for_sampling
    from llmstages.store.peft import peft_state_dict

    ours, hf = copy.deepcopy(ours), copy.deepcopy(hf)
    apply_lora(ours, rank=16, alpha=32, target_modules="all-linear")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    hf = peft.get_peft_model(hf, cfg).eval()
    missing = peft.set_peft_model_state_dict(hf, peft_state_dict(ours)).unexpected_keys
    assert not missing, missing
    if dt == torch.float32:  # the same adapted model on both sides
        probe = torch.arange(16, device=next(ours.parameters()).device)[None]
        with torch.no_grad():
            torch.testing.assert_close(ours(probe), hf(input_ids=probe).logits, rtol=0, atol=1e-4)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (ROLLOUT_PROMPTS, PROMPT), generator=g)
    x = prompts.repeat_interleave(GROUP, 0).to(next(ours.parameters()).device)
    gen = torch.Generator(device=x.device)

    def run(merge: bool):
        def fn() -> None:
            gen.manual_seed(1)
            with merged_for_sampling(ours) if merge else contextlib.nullcontext():
                generate(ours, x, ROLLOUT_NEW, temperature=1.0, generator=gen)

        return fn

    @torch.no_grad()
    def run_hf() -> None:
        hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=ROLLOUT_NEW,
                    min_new_tokens=ROLLOUT_NEW, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    pad_token_id=0)  # fmt: skip

    sides = {"merged": run(True), "apart": run(False), "hf": run_hf} if dt == torch.float32 else {
        "apart": run(False), "hf": run_hf}  # fmt: skip
    t = alternate(sides, rounds)
    tps = {k: x.size(0) * ROLLOUT_NEW / median(v) for k, v in t.items()}
    best = tps.get("merged", tps["apart"])
    merged = f"{tps['merged']:.1f}" if "merged" in tps else "- (bf16: not merged)"
    print(f"| {_name(dt)} | {merged} | {tps['apart']:.1f} | {tps['hf']:.1f} | {best / tps['hf']:.2f} |", flush=True)


def queue(ours: GPT, hf, vocab: int, rounds: int, dt: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 65, (QUEUE_PROMPTS,), generator=g).tolist()
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    eos = list(range(48, vocab, 48))
    device = next(ours.parameters()).device
    out: dict[str, list[list[int]]] = {}

    def replies(tokens: torch.Tensor, n: torch.Tensor) -> list[list[int]]:
        return [t[:k] for t, k in zip(tokens.tolist(), n.tolist())]

    def run_queue() -> None:
        r = generate_queue(ours, prompts, ROLLOUT_NEW, slots=QUEUE_SLOTS, eos_id=eos)
        out["queue"] = replies(r.tokens, r.lengths)

    def run_fixed() -> None:
        got = []
        for s in range(0, QUEUE_PROMPTS, QUEUE_SLOTS):
            r = generate(ours, prompts[s : s + QUEUE_SLOTS], ROLLOUT_NEW, eos_id=eos)
            got += replies(r.tokens, r.lengths)
        out["fixed"] = got

    @torch.no_grad()
    def run_hf() -> None:
        got = []
        for s in range(0, QUEUE_PROMPTS, QUEUE_SLOTS):
            ids, mask = left_pad(prompts[s : s + QUEUE_SLOTS], 0, device)
            seq = hf.generate(ids, attention_mask=mask, max_new_tokens=ROLLOUT_NEW, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)[:, ids.size(1) :]  # fmt: skip
            ended = torch.isin(seq, torch.tensor(eos, device=device)).long()
            n = torch.where(ended.any(-1), ended.argmax(-1) + 1, torch.full_like(ended[:, 0], seq.size(1)))
            got += replies(seq, n)
        out["hf"] = got

    t = alternate({"queue": run_queue, "fixed": run_fixed, "hf": run_hf}, rounds)
    n = [len(r) for r in out["queue"]]
    tps = {k: sum(len(r) for r in out[k]) / median(v) for k, v in t.items()}
    same = out["queue"] == out["fixed"] == out["hf"] if dt == torch.float32 else "-"
    print(f"| {_name(dt)} | {sum(n) / len(n):.0f} / {max(n)} | {tps['queue']:.1f} | {tps['fixed']:.1f} | "
          f"{tps['hf']:.1f} | {tps['queue'] / tps['hf']:.2f} | {same} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
