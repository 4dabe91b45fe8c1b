"""Fine-tuning and alignment on a real shape: ours against transformers + peft (and TRL's log-prob path for DPO).

    python benchmarks/finetune_vs_hf.py [--rounds 3] [--only lora,dpo,full,gen1,gen8] [--device cpu|cuda]
    python benchmarks/finetune_vs_hf.py --compile --only lora,dpo,full   # adds ours with train.compile
    python benchmarks/finetune_vs_hf.py --profile lora --precision bf16   # where one step of ours spends its time

The shape is `smollm2_135m()` (30 layers, d=576, 9 heads / 3 KV heads, SwiGLU 1536, vocabulary 49,152, tied
embeddings) with random weights: a transformers LlamaForCausalLM is built from the published config, saved, and
both sides load those weights. Every task alternates ours and the reference in this process on the same batch:

- lora: LoRA rank 16 (alpha 32, no dropout) on every linear layer of the blocks, AdamW; 8 rows x 128 tokens, the
  first 64 of each row a prompt (not trained). Ours: `peft.apply_peft` + `losses.lm_loss`; reference:
  `peft.get_peft_model` + the model's own loss (`labels=`).
- dpo: the same LoRA policy, 4 pairs (8 rows of 128 tokens, the reply the last 64), the reference the policy with
  its adapters disabled, sigmoid loss with beta 0.1. Ours: `stages.dpo.sequence_scores` (log-probs from hidden
  states in chunks); reference: logits and `trl.trainer.utils.selective_log_softmax`, TRL's DPO log-prob path.
- full: full fine-tuning step, AdamW, 8 x 128. Ours: the fused LM-head loss; reference: `labels=`.
- gen1, gen8: greedy generation of 48 new tokens after a 32-token prompt, batch 1 and 8, with the KV cache;
  no EOS, so both produce every token.

fp32 always; bf16 autocast too where the CPU has native bf16 (AMX or AVX512-BF16; on CUDA where supported): the
table says which. Under bf16 ours holds the frozen linear weights in bf16 (`train.frozen.hold_frozen`, as the
stages do: the LoRA base, and every linear weight for generation); the reference runs autocast over its fp32
weights, as `transformers.Trainer(bf16=True)` and TRL's trainers do with a model loaded in fp32.
`--compile` adds, for the training tasks, ours with its blocks compiled as `train.compile: true` does
(`train.prepare.compile_blocks`; two warm-up rounds, so compilation is not timed) against the same eager reference
(the default of `transformers.Trainer` and TRL); generation decodes with the KV cache, which stays eager.
Tokens/s are medians over --rounds; peak memory is measured in a fresh subprocess per side for the training tasks
(on CPU the peak RSS over the RSS before the model is loaded, so weights count; max allocated on CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, current_rss_mib, machine, median, peak_rss_mib  # noqa: E402

from llmstages import losses as L  # noqa: E402
from llmstages.model import generate, preset  # noqa: E402
from llmstages.peft import apply_peft, disable_adapters  # noqa: E402
from llmstages.store import load_model  # noqa: E402
from llmstages.train.frozen import hold_frozen  # noqa: E402
from llmstages.train.prepare import compile_blocks  # noqa: E402
from llmstages.train.start import fast_bf16  # noqa: E402

ROWS, SEQ, PROMPT = 8, 128, 64
LORA = dict(rank=16, alpha=32, dropout=0.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = ("lora", "dpo", "full", "gen1", "gen8")
TRAINING = ("lora", "dpo", "full")


def reference_dir(path: str) -> str:
    """A transformers Llama with smollm2_135m's published config and random weights, saved to `path`."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    c = preset("smollm2_135m")
    cfg = tf.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                         max_position_embeddings=c.block_size, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    return path


def data(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 49152, (ROWS, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = L.IGNORE_INDEX  # the prompt is not trained
    return {"ids": ids.to(device), "labels": labels.to(device), "targets": L.shift_labels(labels).to(device)}


def load(side: str, path: str, device: str, lora: bool, precision: str, generating: bool = False):
    if side in ("ours", "compiled"):
        model = load_model(path, device=device).train()
        if lora:
            apply_peft(model, "lora", target_modules=TARGETS, **LORA)
        if generating:
            model.requires_grad_(False)
        hold_frozen(model, precision)  # as the stages do: frozen linear weights in bf16 under bf16
        if side == "compiled":
            compile_blocks(model)  # as train.compile does
        return model
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").to(device).train()
    if lora:
        import peft

        cfg = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=TARGETS)
        model = peft.get_peft_model(model, cfg)
    return model


def build(task: str, side: str, path: str, device: str, precision: str):
    """The function one timed round of `task` runs for `side` ("ours", "compiled" or "hf"), and the tokens it
    handles."""
    model = load(side, path, device, task in ("lora", "dpo"), precision, generating=task.startswith("gen"))
    cast = torch.autocast(device, torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    b = data(device)
    if task.startswith("gen"):
        return generation(model, side, int(task[3:]), cast, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_of = {"lora": sft_loss, "full": sft_loss, "dpo": dpo_loss}[task]

    def step() -> None:
        with cast:
            loss = loss_of(model, side, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, ROWS * SEQ


def sft_loss(model, side: str, b: dict[str, torch.Tensor]) -> torch.Tensor:
    if side == "hf":
        return model(input_ids=b["ids"], labels=b["labels"]).loss
    loss, _ = L.lm_loss(model, {"input_ids": b["ids"], "targets": b["targets"]})
    return loss / L.count_targets({"targets": b["targets"]})


def dpo_loss(model, side: str, b: dict[str, torch.Tensor], beta: float = 0.1) -> torch.Tensor:
    """Sigmoid DPO on 4 pairs: rows 0-3 chosen, rows 4-7 rejected (sharing nothing: the cost is the same)."""
    targets = b["targets"].clone()
    targets[:, : SEQ - 64 - 1] = L.IGNORE_INDEX  # the reply is the last 64 tokens
    batch = {"input_ids": b["ids"], "targets": targets, "mask": torch.ones_like(b["ids"])}
    if side != "hf":
        from llmstages.stages.dpo import sequence_scores

        policy = sequence_scores(model, batch)[0]
        with torch.no_grad(), disable_adapters(model):
            ref = sequence_scores(model, batch)[0]
    else:
        from trl.trainer.utils import selective_log_softmax

        def logps(m) -> torch.Tensor:  # TRL's path: logits, selective_log_softmax, summed over the reply
            logits = m(input_ids=batch["input_ids"]).logits
            mask = targets != L.IGNORE_INDEX
            return (selective_log_softmax(logits, targets.masked_fill(~mask, 0)) * mask).sum(-1)

        policy = logps(model)
        with torch.no_grad(), model.disable_adapter():
            ref = logps(model)
    n = ROWS // 2
    return L.dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta)[0]


def generation(model, side: str, batch: int, cast, device: str):
    model.eval()
    prompts = torch.randint(3, 49152, (batch, 32), generator=torch.Generator().manual_seed(2)).to(device)

    @torch.no_grad()
    def run() -> None:
        with cast:
            if side == "ours":
                generate(model, prompts, 48)
            else:
                model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=48,
                               min_new_tokens=48, do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip

    return run, batch * 48


def memory_child(task: str, side: str, path: str, device: str, precision: str) -> None:
    base = current_rss_mib()
    step, _ = build(task, side, path, device, precision)
    for _ in range(2):
        step()
    if device == "cuda":
        print(json.dumps({"peak_mib": torch.cuda.max_memory_allocated() / 2**20}))
    else:
        print(json.dumps({"peak_mib": peak_rss_mib() - base}))


def profile(task: str, path: str, device: str, precision: str, rows: int = 12) -> None:
    """torch.profiler's table of two steps of ours and of the reference (after one warm-up step), by self time,
    with the share of the step each op takes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for side in ("ours", "hf"):
        fn, _ = build(task, side, path, device, precision)
        fn()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            fn()
            fn()
        events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total if device == "cuda" else
                        e.self_cpu_time_total, reverse=True)  # fmt: skip
        total = sum(e.self_device_time_total if device == "cuda" else e.self_cpu_time_total for e in events)
        print(f"# {side}: {task} {precision}, {total / 2e6:.2f} s a step (self time of every op)")
        print("| op | calls a step | share of the step |")
        print("|---|---|---|")
        for e in events[:rows]:
            t = e.self_device_time_total if device == "cuda" else e.self_cpu_time_total
            print(f"| {e.key} | {e.count // 2} | {t / total:.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=",".join(TASKS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", metavar="TASK", help="print where a step of TASK spends its time, ours and HF's")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="with --profile")
    ap.add_argument("--compile", action="store_true", help="add ours with train.compile for the training tasks")
    ap.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        task, side, path, device, precision = args.memory_child
        return memory_child(task, side, path, device, precision)
    if args.profile:
        with tempfile.TemporaryDirectory() as d:
            return profile(args.profile, reference_dir(d), args.device, args.precision)
    tasks = [t for t in args.only.split(",") if t]
    native = fast_bf16(torch.device(args.device))
    precisions = ["fp32", "bf16"] if native else ["fp32"]
    print(f"# fine-tuning vs transformers {__import__('transformers').__version__} + peft "
          f"{__import__('peft').__version__} (+ trl {__import__('trl').__version__} for DPO), smollm2_135m shape, "
          f"random weights; {machine()}; native bf16: {'yes' if native else 'no (bf16 not measured)'}; "
          f"{args.rounds} rounds, medians")  # fmt: skip
    print("| task | precision | ours tok/s | HF tok/s | ours/HF | peak MiB ours / HF | ours/HF memory |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        path = reference_dir(d)
        for task in tasks:
            for precision in precisions:
                sides = ("ours", "compiled", "hf") if args.compile and task in TRAINING else ("ours", "hf")
                built = {side: build(task, side, path, args.device, precision) for side in sides}
                fns = {side: fn for side, (fn, _) in built.items()}
                times = alternate(fns, args.rounds, warmup=2 if "compiled" in fns else 1)
                tps = {side: built[side][1] / median(times[side]) for side in built}
                del built
                mem = {}
                if task in TRAINING:
                    for side in ("ours", "hf"):
                        cmd = [sys.executable, __file__, "--memory-child", task, side, path, args.device, precision]
                        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                        mem[side] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
                memory = (f"{mem['ours']:.0f} / {mem['hf']:.0f} | {mem['ours'] / mem['hf']:.2f}" if mem
                          else "- | -")  # fmt: skip
                print(f"| {task} | {precision} | {tps['ours']:.0f} | {tps['hf']:.0f} | {tps['ours'] / tps['hf']:.2f} "
                      f"| {memory} |", flush=True)  # fmt: skip
                if "compiled" in tps:
                    print(f"| {task} | {precision}, ours compiled | {tps['compiled']:.0f} | {tps['hf']:.0f} "
                          f"| {tps['compiled'] / tps['hf']:.2f} | - | - |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
