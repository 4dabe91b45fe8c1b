"""`llmstages report RUN_DIR [RUN_DIR ...]`: one self-contained `report.html` (PNG plots inlined) for a demo
directory or single stage runs; several directories are drawn on the same axes for comparison.

Per stage: loss and validation loss, learning rate, gradient norm, tokens/s, and what the stage adds (reward,
KL, entropy and clip fraction for PPO/GRPO; margins and accuracy for DPO and the reward model; held-out task
accuracy for SFT). Then the held-out metrics of `summary.json` (one column per directory), the reward-KL
frontier when a directory holds `frontier.json`, and each stage's model answering the same held-out questions.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from llmstages.errors import UserError
from llmstages.monitor.metrics import read_metrics

STAGE_ORDER = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "cai/sft", "cai/dpo")
PANELS: list[tuple[str, tuple[str, ...]]] = [
    ("loss", ("loss", "val_loss")), ("learning rate", ("lr",)), ("gradient norm", ("grad_norm",)),
    ("tokens/s", ("tokens_per_s",)), ("held-out task accuracy", ("task_accuracy",)),
    ("reward (rollouts, held-out)", ("reward_mean", "eval_reward")), ("KL to the reference", ("kl",)),
    ("entropy", ("entropy",)), ("clip fraction", ("clip_fraction",)), ("margin", ("margin", "val_margin")),
    ("pair accuracy", ("accuracy", "val_accuracy")),
]  # fmt: skip


def stage_runs(path: Path) -> dict[str, Path]:
    """The stage runs in a directory: a demo directory's stages, or the directory itself when it is one run."""
    if not path.is_dir():
        raise UserError(f"{path}: not a directory")
    if (path / "metrics.jsonl").is_file():
        return {path.name: path}
    runs = {name: path / name for name in STAGE_ORDER if (path / name / "metrics.jsonl").is_file()}
    if not runs:
        raise UserError(f"{path}: not a run directory (no metrics.jsonl here or in a stage folder, no summary.json)")
    return runs


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_stage(name: str, runs: dict[str, Path]) -> bytes | None:
    """The stage's curves, one line per directory (val_* dashed); None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = {label: read_metrics(p) for label, p in runs.items()}
    logged = {k for rs in records.values() for r in rs if r.get("step", 0) > 0 for k, v in r.items() if v is not None}
    panels = [(title, keys) for title, keys in PANELS if logged & set(keys)]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for label, rs in records.items():
            for k in keys:
                pts = [(r["step"], r[k]) for r in rs if r.get(k) is not None and isinstance(r[k], int | float)]
                if pts:
                    xs, ys = zip(*pts)
                    style = "--" if k.startswith(("val_", "eval_")) else "-"
                    marker = "o" if len(pts) < 12 else None
                    who = f"{label}: {k}" if len(records) > 1 else k
                    ax.plot(xs, ys, style, marker=marker, markersize=3, label=who)
        if title == "loss":  # health flags (monitor/health.py) as red ticks
            for rs in records.values():
                for r in rs:
                    if r.get("event") == "health":
                        ax.axvline(r["step"], color="red", alpha=0.4, linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if title == "tokens/s" or title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(name, fontsize=12)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _health(runs: dict[str, Path]) -> str:
    """The health flags of a stage's runs (red ticks on the loss panel), or that there were none."""
    items = []
    for label, path in runs.items():
        for r in read_metrics(path):
            if r.get("event") == "health":
                items.append(f"<li>{html.escape(label)}, step {r['step']}: {html.escape(r['kind'].replace('_', ' '))}"
                             f": {html.escape(r['detail'])}</li>")  # fmt: skip
    if not items:
        return "<p>health: no loss spike, gradient explosion, NaN, throughput drop or data stall flagged.</p>"
    more = f"<li>... and {len(items) - 20} more</li>" if len(items) > 20 else ""
    return f"<p>health flags:</p><ul>{''.join(items[:20])}{more}</ul>"


def _summary_table(dirs: list[Path]) -> str:
    summaries = {d.name: json.loads((d / "summary.json").read_text()) for d in dirs if (d / "summary.json").is_file()}
    if not summaries:
        return ""
    keys: list[tuple[str, str]] = []
    for s in summaries.values():
        for stage, metrics in s["stages"].items():
            keys += [(stage, k) for k in metrics if (stage, k) not in keys]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in summaries)
    body = []
    for stage, k in keys:
        cells = []
        for s in summaries.values():
            v = s["stages"].get(stage, {}).get(k)
            cells.append(f"<td>{'' if v is None else f'{v:.4g}' if isinstance(v, float) else v}</td>")
        body.append(f"<tr><td>{stage}</td><td>{k}</td>{''.join(cells)}</tr>")
    return (f"<h2>Held-out metrics</h2><table><tr><th>stage</th><th>metric</th>{head}</tr>{''.join(body)}</table>"
            "<p>SFT figures are greedy answers to the held-out people's questions (before: the base model); "
            "rewards, violations, win rates and KL are the oracle's judgement of 4 samples per question at "
            "temperature 1 against the SFT model; the reward model's accuracy is its agreement with the oracle "
            "on pairs of the SFT model's replies.</p>")  # fmt: skip


def _frontier(dirs: list[Path]) -> str:
    parts = []
    for d in dirs:
        png = d / "frontier.png" if (d / "frontier.png").is_file() else d / "frontier" / "frontier.png"
        if png.is_file():
            parts.append(f"<h3>{html.escape(d.name)}</h3>{_img(png.read_bytes())}")
    return "<h2>Reward-KL frontier</h2>" + "".join(parts) if parts else ""


def _img(data: bytes) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def samples(run: Path, n: int = 4, max_new_tokens: int = 12) -> list[tuple[str, dict[str, str]]]:
    """Greedy answers of each stage's final model to the same held-out questions: [(question, {stage: text})]."""
    from llmstages.eval.lm import heldout_questions, show
    from llmstages.model import load_model, load_tokenizer

    questions = heldout_questions(n)
    answers: list[tuple[str, dict[str, str]]] = [(q, {}) for q in questions]
    for stage in STAGE_ORDER:
        final = run / stage / "final"
        if stage in ("pretrain", "reward", "cai/sft") or not (final / "config.json").is_file():
            continue
        replies = show(load_model(final).eval(), load_tokenizer(final), questions, max_new_tokens)
        for (_, row), reply in zip(answers, replies):
            row[stage] = reply
    return answers


def _samples_html(dirs: list[Path]) -> str:
    parts = []
    for d in dirs:
        if not (d / "sft" / "final").is_dir():
            continue
        rows = samples(d)
        stages = [s for s in STAGE_ORDER if any(s in r for _, r in rows)]
        head = "".join(f"<th>{s}</th>" for s in stages)
        body = "".join(f"<tr><td>{html.escape(q)}</td>" + "".join(f"<td>{html.escape(r.get(s, ''))}</td>"
                       for s in stages) + "</tr>" for q, r in rows)  # fmt: skip
        parts.append(f"<h3>{html.escape(d.name)}</h3><table><tr><th>question</th>{head}</tr>{body}</table>")
    if not parts:
        return ""
    return "<h2>The same held-out questions, greedy answers of each stage</h2>" + "".join(parts)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1500px;margin:24px auto;padding:0 16px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}img{max-width:100%;margin:6px 0}h2{margin-top:28px}"""


def write_report(dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write report.html (and plots/*.png) into the first directory, or to `out`."""
    paths = [Path(d) for d in dirs]
    runs = {p: stage_runs(p) for p in paths}
    target = Path(out) if out else paths[0] / "report.html"
    plots = target.parent / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    names = [n for n in STAGE_ORDER if any(n in r for r in runs.values())]
    names += [n for r in runs.values() for n in r if n not in names]
    sections = []
    for name in names:
        per_dir = {p.name if len(paths) > 1 else name: r[name] for p, r in runs.items() if name in r}
        png = plot_stage(name, per_dir)
        if png:
            (plots / f"{name.replace('/', '_')}.png").write_bytes(png)
            sections.append(f"<h2>{html.escape(name)}</h2>{_img(png)}{_health(per_dir)}")
    title = "llmstages report: " + ", ".join(html.escape(str(p)) for p in paths)
    body = _summary_table(paths) + "".join(sections) + _frontier(paths) + _samples_html(paths)
    target.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
                      f"<style>{STYLE}</style></head><body><h1>{title}</h1>{body}</body></html>\n")  # fmt: skip
    return target
