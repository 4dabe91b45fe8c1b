"""`llmstages demo`: the pipeline end to end on the built-in world. So far: tokenizer -> pre-training ->
held-out evaluation (validation perplexity, fact recall, sample completions). Later stages join as they land.

Each stage's `final/` is reused when present, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llmstages.config import PretrainConfig, load_config
from llmstages.data.builtin import World
from llmstages.eval.facts import PROMPTS, fact_recall
from llmstages.model import generate, load_model, load_tokenizer
from llmstages.monitor.metrics import read_metrics

RECIPES = Path(__file__).resolve().parent / "configs"  # also reachable as configs/ from the repository root


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> dict:
    from llmstages.stages import pretrain

    out = Path(out)
    summary: dict = {"stages": {}}
    t0 = time.perf_counter()
    run = out / "pretrain"
    if not (run / "final" / "model.safetensors").is_file():
        overrides = [f"out_dir={run}", "resume=true"]
        if quick:
            overrides += [
                "train.max_steps=60",
                "train.eval_every=30",
                "train.save_every=30",
                "data.builtin_size_mb=0.5",
            ]
        print(f"[1/1] pre-training on the built-in world -> {run}")
        pretrain.main(load_config(PretrainConfig, RECIPES / "pretrain" / "tiny.yaml", overrides))
    model, tok = load_model(run / "final"), load_tokenizer(run / "final")
    world = World(0)
    val = [r for r in read_metrics(run) if "val_loss" in r]
    recall = fact_recall(model, tok, world)
    summary["stages"]["pretrain"] = {"val_loss": val[-1]["val_loss"], "val_ppl": val[-1]["val_ppl"], **recall,
                                     "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    print("\nheld-out evaluation")
    print(f"  pretrain  val_ppl {val[-1]['val_ppl']:.2f}   fact recall {recall['recall']:.1%} (chance 12.5%)")
    print("\nsample completions (greedy)")
    for person in world.people[:3]:
        for attribute in ("town", "job"):
            prompt = PROMPTS[attribute].format(n=person.name)
            ids = tok.encode(prompt)
            text = tok.decode(generate(model, [ids], 8, pad_id=tok.pad_id).tokens[0].tolist())
            print(f"  {prompt!r:38} -> {text.strip()!r:40} (true: {person.get(attribute)})")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {out / 'summary.json'}")
    return summary
