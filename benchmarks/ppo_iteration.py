"""Where the time of one PPO iteration goes, on the tiny model: generation (KV cache, and without it for
comparison), the policy + value forward for old log-probs, the reference forward (LoRA disabled), and the
updates (ppo_epochs x minibatches, forward + backward + AdamW).

    python benchmarks/ppo_iteration.py [--rollout 256] [--new-tokens 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median  # noqa: E402

from llmstages import losses as L  # noqa: E402
from llmstages.data.builtin import builtin_corpus  # noqa: E402
from llmstages.data.chat import prompt_ids  # noqa: E402
from llmstages.data.prompts import builtin_prompts  # noqa: E402
from llmstages.data.tokenizer import train_bpe  # noqa: E402
from llmstages.model import GPT, generate, preset  # noqa: E402
from llmstages.model.generate import sample_replies  # noqa: E402
from llmstages.peft import apply_lora, disable_adapters  # noqa: E402
from llmstages.rl.rollout import reply_rows  # noqa: E402
from llmstages.stages.ppo import ActorCritic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rollout", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--minibatches", type=int, default=4)
    args = ap.parse_args()
    tok = train_bpe(builtin_corpus(0, 0.5), 2048)
    torch.manual_seed(0)
    policy = GPT(preset("llama_tiny", vocab_size=64 * -(-tok.vocab_size // 64), block_size=128, n_kv_heads=4))
    apply_lora(policy, rank=16, alpha=32, target_modules="all-linear")
    ac = ActorCritic(policy, None)
    opt = torch.optim.AdamW([p for p in ac.parameters() if p.requires_grad], lr=1e-5)
    prompts = [prompt_ids(m, tok) for m in builtin_prompts(0, 8)[0]][: args.rollout]
    times: dict[str, list[float]] = {k: [] for k in ("generate", "generate_no_cache", "policy_value", "reference",
                                                     "updates")}  # fmt: skip
    for _ in range(args.rounds):
        ac.eval()
        t0 = time.perf_counter()
        replies, _, _ = sample_replies(policy, tok, prompts, args.new_tokens, 1.0, torch.Generator().manual_seed(0))
        times["generate"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        generate(policy, prompts, args.new_tokens, temperature=1.0, use_cache=False,
                 generator=torch.Generator().manual_seed(0), pad_id=tok.pad_id)  # fmt: skip
        times["generate_no_cache"].append(time.perf_counter() - t0)
        batch = reply_rows(prompts, replies, tok.pad_id, "cpu")
        t0 = time.perf_counter()
        with torch.no_grad():
            old, _, values = ac(batch)
        times["policy_value"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad(), disable_adapters(policy):
            L.token_logprobs(policy(batch["input_ids"], mask=batch["mask"]), batch["targets"])
        times["reference"].append(time.perf_counter() - t0)
        tmask = (batch["targets"] != L.IGNORE_INDEX).float()
        adv = L.whiten(torch.randn_like(old), tmask)
        ac.train()
        t0 = time.perf_counter()
        size = len(prompts) // args.minibatches
        for _ in range(args.epochs):
            for m in range(args.minibatches):
                sel = slice(m * size, (m + 1) * size)
                mb = {k: v[sel] for k, v in batch.items()}
                lp, _, val = ac(mb)
                pg, _, _ = L.ppo_policy_loss(lp, old[sel], adv[sel], tmask[sel])
                vl = L.ppo_value_loss(val, values[sel], adv[sel], tmask[sel])
                (pg + 0.1 * vl).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        times["updates"].append(time.perf_counter() - t0)
    med = {k: median(v) for k, v in times.items()}
    total = med["generate"] + med["policy_value"] + med["reference"] + med["updates"]
    new_tokens = sum(map(len, replies))
    train_tokens = int(batch["mask"].sum()) * args.epochs
    print(f"# PPO iteration: llama_tiny + LoRA r16, rollout {len(prompts)} x {args.new_tokens} new tokens, "
          f"{args.epochs} epochs x {args.minibatches} minibatches, fp32, {machine()}; "
          f"medians of {args.rounds}")  # fmt: skip
    print("| part | seconds | share of the iteration |")
    print("|---|---|---|")
    for k in ("generate", "policy_value", "reference", "updates"):
        print(f"| {k} | {med[k]:.2f} | {med[k] / total:.0%} |")
    print(f"| (generate without the KV cache) | {med['generate_no_cache']:.2f} | "
          f"{med['generate_no_cache'] / med['generate']:.1f}x the cached time |")  # fmt: skip
    print(
        f"\nrollout: {new_tokens / med['generate']:.0f} new tokens/s; training: "
        f"{train_tokens / med['updates']:.0f} tokens/s (prompt + reply tokens through forward and backward)"
    )


if __name__ == "__main__":
    main()
