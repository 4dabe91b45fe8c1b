"""Training step (forward, backward, AdamW) of our model vs Hugging Face transformers, same config and weights.

    python benchmarks/train_step.py [--rounds 10] [--family llama|gpt2|both] [--device cpu|cuda]

Both models run in this process, alternating, with identical weights (ours imported from the HF model) and the
same optimizer settings; the output is tokens/s per model and the ratio ours/HF (medians). Peak memory of the
step is measured in a fresh subprocess per model (peak RSS over the RSS after building model and optimizer).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, current_rss_mib, machine, median, peak_rss_mib  # noqa: E402

from llmstages.losses import cross_entropy, linear_cross_entropy, shift_labels  # noqa: E402
from llmstages.store import load_model  # noqa: E402

SIZE = dict(n_layers=6, d_model=384, n_heads=6, vocab_size=8192, batch=8, seq=256)


def hf_model(family: str):
    import transformers as tf

    tf.logging.set_verbosity_error()
    s = SIZE
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=s["vocab_size"], n_positions=s["seq"], n_embd=s["d_model"],
                            n_layer=s["n_layers"], n_head=s["n_heads"], resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)  # fmt: skip
    else:
        cfg = tf.LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["d_model"], intermediate_size=1024,
                             num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                             num_key_value_heads=s["n_heads"], max_position_embeddings=s["seq"])  # fmt: skip
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).train()


def save_reference(family: str, path: str) -> str:
    hf_model(family).save_pretrained(path, safe_serialization=True)
    return path


def build(which: str, path: str, device: str):
    """The step function of 'ours', 'ours-unfused' (logits + F.cross_entropy) or 'hf', from the same weights."""
    if which == "hf":
        import transformers as tf

        model = tf.AutoModelForCausalLM.from_pretrained(path).to(device).train()
    else:
        model = load_model(path, device=device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, SIZE["vocab_size"], (SIZE["batch"], SIZE["seq"]), generator=g).to(device)
    y = shift_labels(x)

    def step() -> None:
        if which == "hf":
            loss = model(input_ids=x, labels=x).loss
        elif which == "ours":  # what our training loop runs: the fused, chunked LM-head cross-entropy
            loss = linear_cross_entropy(model.hidden_states(x), model.lm_head.weight, y)
        else:
            loss = cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def memory_child(which: str, path: str, device: str) -> None:
    base = current_rss_mib()
    step = build(which, path, device)
    built = current_rss_mib()
    for _ in range(3):
        step()
    if device == "cuda":
        print(json.dumps({"peak_mib": torch.cuda.max_memory_allocated() / 2**20}))
    else:
        print(json.dumps({"peak_mib": peak_rss_mib() - base, "model_mib": built - base}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--family", default="both", choices=["llama", "gpt2", "both"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-child", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(*args.memory_child, args.device)
    tokens = SIZE["batch"] * SIZE["seq"]
    names = ("ours", "ours-unfused", "hf")
    print(f"# train step: {SIZE}, fp32, AdamW, {machine()}; {args.rounds} rounds, medians")
    print("| family | ours tok/s | ours, unfused CE, tok/s | HF tok/s | ours/HF | unfused/HF "
          "| peak MiB over start: ours / unfused / HF |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for family in ["llama", "gpt2"] if args.family == "both" else [args.family]:
        with tempfile.TemporaryDirectory() as d:
            path = save_reference(family, d)
            t = alternate({w: build(w, path, args.device) for w in names}, args.rounds)
            tps = {w: tokens / median(t[w]) for w in t}
            mem = {}
            for w in names:
                out = subprocess.run([sys.executable, __file__, "--memory-child", w, path, "--device", args.device],
                                     capture_output=True, text=True, check=True).stdout  # fmt: skip
                mem[w] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
        print(f"| {family} | {tps['ours']:.0f} | {tps['ours-unfused']:.0f} | {tps['hf']:.0f} | "
              f"{tps['ours'] / tps['hf']:.2f} | {tps['ours-unfused'] / tps['hf']:.2f} | "
              f"{mem['ours']:.0f} / {mem['ours-unfused']:.0f} / {mem['hf']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
