"""`llmstages demo`: all three stages end to end on the built-in world, evaluated on the same held-out sets.

    llmstages demo [--out runs/demo] [--seed N] [--world-seed M] [--quick]

tokenizer + pre-training -> SFT (LoRA) -> reward model on oracle-labelled pairs -> DPO, PPO and GRPO from the SFT
model -> Constitutional AI (revise -> SFT -> AI-labelled cDPO) -> evaluation of every model on the held-out
people's questions (the oracle judges; win rate and KL against the SFT model) -> `summary.json` with every
figure checked against its target (TARGETS) -> `report.html`. Each step runs the shipped recipe (configs/) with
`model.path` chained. `--world-seed` fixes the world (its facts, corpus, questions and splits), `--seed` the runs
(initialisation, data order, sampling). `--quick` shrinks every step to a few steps (a smoke test, under two
minutes). A step whose `final/` exists is reused, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstages.errors import UserError
from llmstages.monitor.metrics import read_metrics

# step -> (recipe, overrides for the full demo, extra overrides for --quick)
PLAN: dict[str, tuple[str, list[str], list[str]]] = {
    "pretrain": (
        "pretrain/tiny.yaml",
        [],
        ["train.max_steps=60", "train.eval_every=30", "train.save_every=30", "data.builtin_size_mb=0.5"],
    ),
    "sft": ("sft/lora.yaml", [], ["train.max_steps=40", "train.eval_every=40", "data.max_eval_examples=32"]),
    "reward": ("reward/lora.yaml", [], ["train.max_steps=10", "train.eval_every=10", "data.samples=2"]),
    "dpo": ("dpo/lora.yaml", [], ["train.max_steps=8", "train.eval_every=8"]),
    "ppo": (
        "ppo/lora.yaml",
        [],
        ["train.max_steps=4", "ppo.rollout_size=8", "ppo.minibatches=2", "ppo.ppo_epochs=2", "train.eval_every=4"],
    ),
    "grpo": ("grpo/lora.yaml", [], ["train.max_steps=3", "train.eval_every=3", "grpo.prompts_per_step=4"]),
    "cai": (
        "cai/builtin.yaml",
        [],
        ["max_prompts=24", "run.sft=[train.max_steps=8]", "run.dpo=[dpo.loss=cdpo,train.max_steps=4]"],
    ),
}
ALIGNED = ("dpo", "ppo", "grpo", "cai")
ATTRIBUTES = ("town", "colour", "pet", "job")


@dataclass(frozen=True)
class Target:
    """`stages[stage][metric] op bound`; a bound given as (stage, metric, factor, offset) is factor x that
    figure + offset (e.g. CAI's violations at most half the SFT model's)."""

    stage: str
    metric: str
    op: str
    bound: float | tuple[str, str, float, float]
    says: str

    def threshold(self, stages: dict[str, dict[str, Any]]) -> float | None:
        if isinstance(self.bound, tuple):
            stage, metric, factor, offset = self.bound
            base = stages.get(stage, {}).get(metric)
            return None if base is None else factor * base + offset
        return self.bound

    def check(self, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
        value, bound = stages.get(self.stage, {}).get(self.metric), self.threshold(stages)
        met = None
        if value is not None and bound is not None:
            met = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[self.op]
        return {
            "stage": self.stage,
            "metric": self.metric,
            "target": self.says,
            "value": value,
            "bound": bound,
            "met": met,
        }


# What the demo must show on any machine and seed (the slow suite and benchmarks/demo_sweep.py check them).
TARGETS = (
    *(Target("pretrain", f"recall_{a}", ">=", 0.95, ">= 0.95") for a in ATTRIBUTES),
    Target("sft", "task_accuracy_before", "<", 0.1, "< 0.1"),
    Target("sft", "task_accuracy", ">=", 0.70, ">= 0.70"),
    Target("reward", "accuracy", ">=", 0.85, ">= 0.85"),
    *(Target(s, "win_rate_vs_sft", ">=", 0.65, ">= 0.65") for s in ("dpo", "ppo", "grpo")),
    Target(
        "cai",
        "principle_violation_rate_after",
        "<=",
        ("cai", "principle_violation_rate_before", 0.25, 0.0),
        "<= 0.25 x before",
    ),
    Target("cai", "violation_rate_after", "<=", ("cai", "violation_rate_before", 0.5, 0.0), "<= 0.5 x before"),
    Target("cai", "fact_accuracy", ">=", ("sft", "fact_accuracy", 1.0, -0.02), ">= SFT's - 0.02"),
    Target("cai", "label_agreement", ">=", 0.8, ">= 0.8"),
)


def check_targets(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target with the run's value, its bound and whether it is met (None: the figure is missing)."""
    return [t.check(stages) for t in TARGETS]


def glance(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each stage's headline figure before -> after with its target, for the report's first figure: rates in
    [0, 1]; `before` is what the stage started from (chance 0.5 for a win rate or a pair judgement)."""
    get = lambda stage, key: stages.get(stage, {}).get(key)  # noqa: E731
    checked = {(r["stage"], r["metric"]): r for r in check_targets(stages)}

    def row(label: str, before: Any, stage: str, metric: str, lower: bool = False, ceiling: Any = None) -> dict:
        t = checked[(stage, metric)]
        return {
            "label": label,
            "before": before,
            "after": t["value"],
            "bound": t["bound"],
            "met": t["met"],
            "lower_is_better": lower,
            "ceiling": ceiling,
        }

    recalls = [get("pretrain", f"recall_{a}") for a in ATTRIBUTES]
    worst = min(ATTRIBUTES, key=lambda a: get("pretrain", f"recall_{a}") or 0.0)
    rows = [
        row(
            f"pretrain: fact recall, lowest attribute ({worst})",
            get("pretrain", "recall_before"),
            "pretrain",
            f"recall_{worst}",
        )
    ]
    rows[0]["met"] = None if None in recalls else all(r >= 0.95 for r in recalls)
    rows.append(row("sft: held-out task accuracy", get("sft", "task_accuracy_before"), "sft", "task_accuracy"))
    rows.append(row("reward: accuracy on held-out pairs", 0.5, "reward", "accuracy"))
    for name in ("dpo", "ppo", "grpo"):
        rows.append(row(f"{name}: win rate vs SFT", 0.5, name, "win_rate_vs_sft", ceiling=get(name, "win_ceiling")))
    rows.append(
        row("cai: oracle violations", get("cai", "violation_rate_before"), "cai", "violation_rate_after", lower=True)
    )
    rows.append(
        row(
            "cai: principle violations",
            get("cai", "principle_violation_rate_before"),
            "cai",
            "principle_violation_rate_after",
            lower=True,
        )
    )
    rows.append(row("cai: held-out fact accuracy", get("sft", "fact_accuracy"), "cai", "fact_accuracy"))
    rows.append(row("cai: AI labels agree with the oracle", 0.5, "cai", "label_agreement"))
    return rows


def final_dir(out: Path, name: str) -> Path:
    """Where a step leaves its model (CAI's is the DPO run inside its folder)."""
    return out / "cai" / "dpo" / "final" if name == "cai" else out / name / "final"


def run_step(out: Path, name: str, quick: bool, seed: int = 0, world_seed: int = 0) -> float:
    """Train one step of the pipeline unless its final model is already there; returns the seconds it took. The
    step's config is its shipped recipe (with the --quick settings), chained to the step before it."""
    from llmstages.stages import STAGES

    recipe, full, short = PLAN[name]
    if (final_dir(out, name) / "config.json").is_file():
        return 0.0
    previous = {"pretrain": None, "sft": out / "pretrain" / "final"}.get(name, out / "sft" / "final")
    cfg = STAGES[name].chained(recipe, [*full, *(short if quick else [])], out / name, seed, world_seed, previous)
    t0 = time.perf_counter()
    STAGES[name].main(cfg, True)
    return time.perf_counter() - t0


def _last(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return values[-1] if values else None


def evaluate(out: Path, quick: bool, seed: int = 0, world_seed: int = 0) -> dict[str, dict[str, Any]]:
    """Held-out metrics of every step, keyed as in summary.json."""
    from llmstages.eval.facts import fact_accuracy
    from llmstages.eval.policy import ORACLE, evaluate_dir, label_agreement
    from llmstages.store import load_model, load_tokenizer

    samples = 1 if quick else 4
    sft_dir = str(out / "sft" / "final")

    def facts(model_dir: str) -> float:
        return fact_accuracy(load_model(model_dir).eval(), load_tokenizer(model_dir), world_seed)

    pre = read_metrics(out / "pretrain")
    sft_records = read_metrics(out / "sft")
    start = next((r for r in sft_records if r.get("event") == "start"), {})
    pre_start = next((r for r in pre if r.get("event") == "start"), {})
    # 8 samples a question: the reward model is judged on every pair of them the oracle separates (~1,400)
    sft_eval = evaluate_dir(
        sft_dir,
        None,
        ORACLE,
        samples=2 if quick else 8,
        seed=seed,
        world_seed=world_seed,
        judge=str(out / "reward" / "final"),
    )
    stages: dict[str, dict[str, Any]] = {
        "pretrain": {
            "val_loss": _last(pre, "val_loss"),
            "val_ppl": _last(pre, "val_ppl"),
            "recall_before": pre_start.get("recall"),
            "recall": _last(pre, "recall"),
            **{f"recall_{a}": _last(pre, f"recall_{a}") for a in ATTRIBUTES},
        },
        "sft": {
            "task_accuracy": _last(sft_records, "task_accuracy"),
            "task_accuracy_before": start.get("task_accuracy"),
            "exact_reply": _last(sft_records, "exact_reply"),
            "fact_accuracy": facts(sft_dir),
            "oracle_reward": sft_eval["reward"],
            "violation_rate": sft_eval["violation_rate"],
            "principle_violation_rate": sft_eval["principle_violation_rate"],
            "length": sft_eval["length"],
        },
        "reward": {
            "accuracy": sft_eval["judge_accuracy"],
            "pairs": sft_eval["judge_pairs"],
            "val_accuracy": _last(read_metrics(out / "reward"), "val_accuracy"),
        },
    }
    for name in ALIGNED:
        model_dir = str(final_dir(out, name))
        e = evaluate_dir(model_dir, sft_dir, ORACLE, samples=samples, seed=seed, world_seed=world_seed)
        stages[name] = {
            "oracle_reward": e["reward"],
            "win_rate_vs_sft": e["win_rate"],
            "kl": e["kl"],
            "win_ceiling": e["win_ceiling"],
            "violation_rate": e["violation_rate"],
            "principle_violation_rate": e["principle_violation_rate"],
            "length": e["length"],
            "fact_accuracy": facts(model_dir),
        }
    cai, sft = stages["cai"], stages["sft"]
    cai["violation_rate_before"], cai["violation_rate_after"] = sft["violation_rate"], cai["violation_rate"]
    cai["principle_violation_rate_before"] = sft["principle_violation_rate"]
    cai["principle_violation_rate_after"] = cai["principle_violation_rate"]
    labels = label_agreement([str(out / "cai" / "label" / "pairs.jsonl")], world_seed=world_seed)
    cai["label_agreement"] = labels["label_agreement"]
    return stages


def machine() -> dict[str, Any]:
    """What the run ran on: the CPU, its native bf16, torch's threads, the precision `auto` picks (the recipes'
    default; LLMSTAGES_AUTO_PRECISION changes it)."""
    import torch

    from llmstages.train.start import fast_bf16, resolve_precision

    cpu = platform.processor() or platform.machine()
    try:
        names = [
            r.split(":", 1)[1].strip()
            for r in Path("/proc/cpuinfo").read_text().splitlines()
            if r.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "cpu": cpu,
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native_bf16": fast_bf16(torch.device(device)),
        "precision": resolve_precision("auto", torch.device(device)),
    }


def _claim(out: Path, seeds: dict[str, Any]) -> None:
    """The folder is this demo's: new, empty, or made by a demo with the same seeds (whose steps are reused)."""
    from llmstages.outputs import refuse_through_file

    refuse_through_file(out, "--out")
    mark = out / "demo.json"
    if mark.is_file():
        try:
            made = json.loads(mark.read_text())
        except (ValueError, OSError) as e:  # not JSON, not UTF-8, unreadable
            raise UserError(f"{mark}: damaged demo mark ({type(e).__name__}); choose another --out") from None
        if not isinstance(made, dict):
            raise UserError(f"{mark}: damaged demo mark (got {made!r}); choose another --out")
        if made != seeds:
            raise UserError(f"{out} holds a demo run with {made}; this one has {seeds}: choose another --out")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not a demo run folder: choose another --out (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps(seeds) + "\n")


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, world_seed: int = 0) -> dict:
    from llmstages.report import write_report

    out = Path(out)
    _claim(out, {"seed": seed, "world_seed": world_seed, "quick": quick})
    seconds_file = out / "seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    names = list(PLAN)
    t_all = time.perf_counter()
    for i, name in enumerate(names, 1):
        print(f"\n[{i}/{len(names) + 2}] {name} -> {out / name}", flush=True)
        took = run_step(out, name, quick, seed, world_seed)
        if took:
            seconds[name] = round(took, 1)
            seconds_file.write_text(json.dumps(seconds, indent=1) + "\n")
        else:
            print(f"  reusing {final_dir(out, name)}")
    print(f"\n[{len(names) + 1}/{len(names) + 2}] evaluation on the held-out people's questions", flush=True)
    t0 = time.perf_counter()
    stages = evaluate(out, quick, seed, world_seed)
    seconds["eval"] = round(time.perf_counter() - t0, 1)
    for name, secs in seconds.items():
        stages.setdefault(name, {})["seconds"] = secs
    stages = _finite(stages)
    summary = {
        "quick": quick,
        "seed": seed,
        "world_seed": world_seed,
        "machine": machine(),
        "seconds_total": round(sum(seconds.values()), 1),
        "stages": stages,
        "targets": check_targets(stages),
        "glance": glance(stages),
        "this_run_seconds": round(time.perf_counter() - t_all, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n[{len(names) + 2}/{len(names) + 2}] report")
    report = write_report([out])
    print(table(summary))
    print(f"\nwrote {out / 'summary.json'} and {report}")
    return summary


def _finite(x: Any) -> Any:
    """NaN (e.g. no pair to judge) as null, so that summary.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return None if isinstance(x, float) and x != x else x


def table(summary: dict[str, Any]) -> str:
    """The headline figures, one line per stage, then the targets met and missed."""
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    s = summary["stages"]
    recall = ", ".join(f"{a} {fmt(s['pretrain'].get(f'recall_{a}'))}" for a in ATTRIBUTES)
    lines = [
        f"  pretrain  val_ppl {fmt(s['pretrain']['val_ppl'])}, fact recall {recall}",
        f"  sft       task_accuracy {fmt(s['sft']['task_accuracy_before'])} -> {fmt(s['sft']['task_accuracy'])}, "
        f"oracle violations {fmt(s['sft']['violation_rate'])}",
        f"  reward    accuracy on held-out pairs {fmt(s['reward']['accuracy'])}",
    ]
    for name in ("dpo", "ppo", "grpo"):
        lines.append(
            f"  {name:<9} win rate vs SFT {fmt(s[name]['win_rate_vs_sft'])} (ceiling "
            f"{fmt(s[name]['win_ceiling'])}), oracle reward {fmt(s[name]['oracle_reward'])}, "
            f"KL {fmt(s[name]['kl'])}"
        )
    c = s["cai"]
    lines.append(
        f"  cai       violations {fmt(c['violation_rate_before'])} -> {fmt(c['violation_rate_after'])}, "
        f"principle violations {fmt(c['principle_violation_rate_before'])} -> "
        f"{fmt(c['principle_violation_rate_after'])}, fact accuracy {fmt(s['sft']['fact_accuracy'])} -> "
        f"{fmt(c['fact_accuracy'])}, label agreement {fmt(c['label_agreement'])}"
    )
    rows = summary.get("targets", [])
    missed = [f"{r['stage']} {r['metric']} {fmt(r['value'])} (target {r['target']})" for r in rows if not r["met"]]
    lines.append(
        f"  targets   {sum(bool(r['met']) for r in rows)} of {len(rows)} met"
        + (f"; missed: {'; '.join(missed)}" if missed else "")
    )
    return "\n".join(lines)
