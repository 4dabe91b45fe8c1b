"""The reward-KL frontier (the DPO paper's controlled-sentiment figure, in miniature, on the built-in world).

    llmstages frontier --sft runs/sft-lora/final --out runs/frontier [--dpo-betas 0.1 0.5 2] [--ppo-kl 0.05 0.5 2]

For each DPO `beta` and each PPO KL coefficient, align the SFT model with the shipped recipe (configs/dpo/lora.yaml,
configs/ppo/lora.yaml; extra `key=value` overrides apply to both, `dpo:key=value` or `ppo:key=value` to one
kind), then judge the result on held-out prompts with `eval.policy.compare`: the oracle's mean reward, the win
rate against the SFT model, and KL(policy || SFT). Writes `frontier.json`, `frontier.md` (a table) and
`frontier.png` (reward against KL) to `--out`. Runs whose `final/` exists are reused, so a stopped sweep
continues.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from llmstages.eval.policy import evaluate_dir
from llmstages.outputs import claim_run_dir, start_run_dir

COLUMNS = ("method", "knob", "reward", "win_rate", "win_ceiling", "violation_rate", "kl", "kl_per_token")


def run_frontier(
    sft: str | Path,
    out: str | Path,
    dpo_betas: Sequence[float] = (0.1, 0.5, 2.0),
    ppo_kl: Sequence[float] = (0.05, 0.5, 2.0),
    overrides: Sequence[str] = (),
    samples: int = 4,
    progress: bool = True,
) -> list[dict]:
    from llmstages.stages import STAGES

    out = Path(out)
    claim_run_dir(out, "frontier", resume=True, overwrite=False, what="--out")  # its finished runs are reused
    base = evaluate_dir(str(sft), str(sft), samples=samples)  # checks the SFT model before anything is written
    start_run_dir(out, "frontier", overwrite=False)
    rows = [{"method": "sft", "knob": "", **base, "kl": 0.0, "kl_per_token": 0.0}]
    runs = [("dpo", f"beta={b}", f"dpo.beta={b}") for b in dpo_betas]
    runs += [("ppo", f"kl_coef={k}", f"ppo.kl_coef={k}") for k in ppo_kl]
    for method, knob, knob_override in runs:
        run = out / f"{method}-{knob.replace('=', '')}"
        if not (run / "final" / "config.json").is_file():
            if progress:
                print(f"frontier: {method} {knob} -> {run}")
            mine = [
                o.split(":", 1)[1] if o.startswith(f"{method}:") else o
                for o in overrides
                if not o.startswith(("dpo:", "ppo:")) or o.startswith(f"{method}:")
            ]
            STAGES[method].run(
                f"{method}/lora.yaml",
                [f"model.path={sft}", f"out_dir={run}", "resume=true", knob_override, *mine],
                progress=False,
            )
        result = evaluate_dir(str(run / "final"), str(sft), samples=samples)
        rows.append({"method": method, "knob": knob, **result})
        if progress:
            print("  " + "  ".join(f"{k} {rows[-1][k]:.3g}" for k in ("reward", "win_rate", "kl")))
    (out / "frontier.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "frontier.md").write_text(table(rows))
    plot(rows, out / "frontier.png")
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table of the sweep."""
    fmt = lambda v: v if isinstance(v, str) else f"{v:.3f}"  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Oracle reward against KL(policy || SFT), one line per method, the SFT model at KL 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    sft = next(r for r in rows if r["method"] == "sft")
    ax.scatter([0.0], [sft["reward"]], color="black", zorder=3, label="SFT")
    for method, marker in (("dpo", "o"), ("ppo", "s")):
        pts = sorted((r["kl"], r["reward"], r["knob"]) for r in rows if r["method"] == method)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method.upper())
        for kl, reward, knob in pts:
            ax.annotate(knob.split("=")[1], (kl, reward), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KL(policy || SFT), nats per reply")
    ax.set_ylabel("oracle reward (max 5)")
    ax.set_title("Reward-KL frontier, held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
