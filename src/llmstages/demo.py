"""`llmstages demo`: all three stages end to end on the built-in world, evaluated on the same held-out sets.

    llmstages demo [--out runs/demo] [--quick]

tokenizer + pre-training -> SFT (LoRA) -> reward model on oracle-labelled pairs -> DPO, PPO and GRPO from the SFT
model -> Constitutional AI (revise -> SFT -> AI-labelled cDPO) -> evaluation of every model on the held-out
people's questions (the oracle judges; win rate and KL against the SFT model) -> `summary.json` and
`report.html`. Each step runs the shipped recipe (configs/) with `model.path` chained; `--quick` shrinks every
step to a few steps (a smoke test, under two minutes). A step whose `final/` exists is reused, so an
interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmstages.config import load_config
from llmstages.monitor.metrics import read_metrics

RECIPES = Path(__file__).resolve().parent / "configs"  # also reachable as configs/ from the repository root

# step -> (recipe, overrides for the full demo, extra overrides for --quick)
PLAN: dict[str, tuple[str, list[str], list[str]]] = {
    "pretrain": ("pretrain/tiny.yaml", ["train.max_steps=500"],
                 ["train.max_steps=60", "train.eval_every=30", "train.save_every=30", "data.builtin_size_mb=0.5"]),
    "sft": ("sft/lora.yaml", [], ["train.max_steps=40", "train.eval_every=40", "data.max_eval_examples=32"]),
    "reward": ("reward/full.yaml", [], ["train.max_steps=10", "train.eval_every=10", "data.samples=2"]),
    "dpo": ("dpo/lora.yaml", [], ["train.max_steps=8", "train.eval_every=8"]),
    "ppo": ("ppo/lora.yaml", [], ["train.max_steps=4", "ppo.rollout_size=8", "ppo.minibatches=2",
                                  "ppo.ppo_epochs=2", "train.eval_every=4"]),
    "grpo": ("grpo/lora.yaml", [], ["train.max_steps=3", "train.eval_every=3", "grpo.prompts_per_step=4"]),
    "cai": ("cai/builtin.yaml", [], ["max_prompts=24", "run.sft=[train.max_steps=8]",
                                     "run.dpo=[dpo.loss=cdpo,train.max_steps=4]"]),
}  # fmt: skip
ALIGNED = ("dpo", "ppo", "grpo", "cai")


def _stage_runner(name: str) -> Callable[[Any], Any]:
    from llmstages import config
    from llmstages.stages import constitutional, dpo, grpo, ppo, pretrain, reward, sft

    mains = {"pretrain": (pretrain.main, config.PretrainConfig), "sft": (sft.main, config.SFTConfig),
             "reward": (reward.main, config.RewardConfig), "dpo": (dpo.main, config.DPOConfig),
             "ppo": (ppo.main, config.PPOConfig), "grpo": (grpo.main, config.GRPOConfig),
             "cai": (constitutional.main_run, config.CAIConfig)}  # fmt: skip
    return mains[name]


def final_dir(out: Path, name: str) -> Path:
    """Where a step leaves its model (CAI's is the DPO run inside its folder)."""
    return out / "cai" / "dpo" / "final" if name == "cai" else out / name / "final"


def run_step(out: Path, name: str, quick: bool) -> float:
    """Train one step of the pipeline unless its final model is already there; returns the seconds it took."""
    recipe, full, short = PLAN[name]
    if (final_dir(out, name) / "config.json").is_file():
        return 0.0
    overrides = [f"out_dir={out / name}", *full, *(short if quick else [])]
    previous = {"pretrain": None, "sft": out / "pretrain" / "final"}.get(name, out / "sft" / "final")
    if previous is not None:
        overrides.append(f"model.path={previous}")
    if name != "cai":
        overrides.append("resume=true")
    main, cls = _stage_runner(name)
    t0 = time.perf_counter()
    main(load_config(cls, RECIPES / recipe, overrides))
    return time.perf_counter() - t0


def _last(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return values[-1] if values else None


def evaluate(out: Path, quick: bool) -> dict[str, dict[str, float]]:
    """Held-out metrics of every step, keyed as in summary.json."""
    from llmstages.eval.policy import ORACLE, evaluate_dir, label_agreement

    samples = 1 if quick else 4
    sft_dir = str(out / "sft" / "final")
    pre = read_metrics(out / "pretrain")
    sft_records = read_metrics(out / "sft")
    start = next((r for r in sft_records if r.get("event") == "start"), {})
    sft_eval = evaluate_dir(sft_dir, None, ORACLE, samples=max(samples, 2), judge=str(out / "reward" / "final"))
    stages: dict[str, dict[str, float]] = {
        "pretrain": {"val_loss": _last(pre, "val_loss"), "val_ppl": _last(pre, "val_ppl")},
        "sft": {"task_accuracy": _last(sft_records, "task_accuracy"),
                "task_accuracy_before": start.get("task_accuracy"), "exact_reply": _last(sft_records, "exact_reply"),
                "oracle_reward": sft_eval["reward"], "violation_rate": sft_eval["violation_rate"],
                "length": sft_eval["length"]},
        "reward": {"accuracy": sft_eval["judge_accuracy"], "pairs": sft_eval["judge_pairs"],
                   "val_accuracy": _last(read_metrics(out / "reward"), "val_accuracy")},
    }  # fmt: skip
    for name in ALIGNED:
        e = evaluate_dir(str(final_dir(out, name)), sft_dir, ORACLE, samples=samples)
        stages[name] = {"oracle_reward": e["reward"], "win_rate_vs_sft": e["win_rate"], "kl": e["kl"],
                        "violation_rate": e["violation_rate"], "length": e["length"],
                        "win_ceiling": e["win_ceiling"]}  # fmt: skip
    cai = stages["cai"]
    cai["violation_rate_before"] = stages["sft"]["violation_rate"]
    cai["violation_rate_after"] = cai["violation_rate"]
    cai["label_agreement"] = label_agreement([str(out / "cai" / "label" / "pairs.jsonl")])["label_agreement"]
    return stages


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> dict:
    from llmstages.monitor.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds_file = out / "seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    names = list(PLAN)
    t_all = time.perf_counter()
    for i, name in enumerate(names, 1):
        print(f"\n[{i}/{len(names) + 2}] {name} -> {out / name}", flush=True)
        took = run_step(out, name, quick)
        if took:
            seconds[name] = round(took, 1)
            seconds_file.write_text(json.dumps(seconds, indent=1) + "\n")
        else:
            print(f"  reusing {final_dir(out, name)}")
    print(f"\n[{len(names) + 1}/{len(names) + 2}] evaluation on the held-out people's questions", flush=True)
    t0 = time.perf_counter()
    stages = evaluate(out, quick)
    seconds["eval"] = round(time.perf_counter() - t0, 1)
    for name, secs in seconds.items():
        stages.setdefault(name, {})["seconds"] = secs
    summary = {"quick": quick, "seconds_total": round(sum(seconds.values()), 1), "stages": stages,
               "this_run_seconds": round(time.perf_counter() - t_all, 1)}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2) + "\n")
    print(f"\n[{len(names) + 2}/{len(names) + 2}] report")
    report = write_report([out])
    print(table(stages))
    print(f"\nwrote {out / 'summary.json'} and {report}")
    return summary


def _finite(x: Any) -> Any:
    """NaN (e.g. no pair to judge) as null, so that summary.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return None if isinstance(x, float) and x != x else x


def table(stages: dict[str, dict[str, float]]) -> str:
    """The headline figures, one line per stage."""
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    s = stages
    lines = [
        f"  pretrain  val_ppl {fmt(s['pretrain']['val_ppl'])}",
        f"  sft       task_accuracy {fmt(s['sft']['task_accuracy_before'])} -> {fmt(s['sft']['task_accuracy'])}, "
        f"oracle violations {fmt(s['sft']['violation_rate'])}",
        f"  reward    accuracy on held-out pairs {fmt(s['reward']['accuracy'])}",
    ]
    for name in ("dpo", "ppo", "grpo"):
        lines.append(f"  {name:<9} win rate vs SFT {fmt(s[name]['win_rate_vs_sft'])}, oracle reward "
                     f"{fmt(s[name]['oracle_reward'])}, KL {fmt(s[name]['kl'])}")  # fmt: skip
    c = s["cai"]
    lines.append(f"  cai       violations {fmt(c['violation_rate_before'])} -> {fmt(c['violation_rate_after'])}, "
                 f"label agreement {fmt(c['label_agreement'])}")  # fmt: skip
    return "\n".join(lines)
