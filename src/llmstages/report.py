"""`llmstages report RUN_DIR [RUN_DIR ...]`: one self-contained `report.html` (PNG plots inlined) for a demo
directory or single stage runs; several directories are drawn on the same axes for comparison.

A demo directory's report opens with the pipeline at a glance (each stage's headline figure before -> after
against its target, from `summary.json`), the targets met and missed, and three held-out questions answered by
every stage. Several demo directories (a seed sweep) show every run's figure and the min / median / max. Then
per stage: loss and validation loss, learning rate, gradient norm, tokens/s, and what the stage adds (reward,
KL, entropy and clip fraction for PPO/GRPO; margins and accuracy for DPO and the reward model; held-out task
accuracy for SFT; fact recall in pre-training), with its health flags folded; the reward-KL frontier when a
directory holds `frontier.json`.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from llmstages.errors import UserError
from llmstages.monitor.metrics import read_metrics

STAGE_ORDER = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "cai/sft", "cai/dpo")
PANELS: list[tuple[str, tuple[str, ...]]] = [
    ("loss", ("loss", "val_loss")),
    ("fact recall", ("recall_town", "recall_colour", "recall_pet", "recall_job")),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("tokens/s", ("tokens_per_s",)),
    ("held-out task accuracy", ("task_accuracy",)),
    ("reward (rollouts, held-out)", ("reward_mean", "eval_reward")),
    ("KL to the reference per token, on the policy's samples (k1 PPO, k3 GRPO)", ("kl_k1", "kl_k3")),
    (
        "log pi/ref per token of the pairs' replies (not a KL)",
        ("logratio/chosen", "logratio/rejected", "val_logratio/chosen", "val_logratio/rejected"),
    ),
    ("KL from the rollout policy to the updated one (k3)", ("kl_old_new_k3",)),
    ("entropy", ("entropy",)),
    ("clip fraction", ("clip_fraction",)),
    ("reward margin chosen - rejected", ("margin", "val_margin")),
    ("pair accuracy (chosen scored above rejected)", ("accuracy", "val_accuracy")),
]


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
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": MARK})
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
    """One line with the counts of a stage's health flags (red ticks on the loss panel), the list folded."""
    items, counts = [], {}
    for label, path in runs.items():
        for r in read_metrics(path):
            if r.get("event") == "health":
                kind = r["kind"].replace("_", " ")
                counts[kind] = counts.get(kind, 0) + 1
                items.append(
                    f"<li>{html.escape(label)}, step {r['step']}: {html.escape(kind)}: {html.escape(r['detail'])}</li>"
                )
    if not items:
        return "<p>health: no loss spike, gradient explosion, NaN, sustained throughput drop or data stall.</p>"
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    return f"<details><summary>health: {html.escape(summary)}</summary><ul>{''.join(items)}</ul></details>"


def _summaries(dirs: list[Path]) -> dict[str, dict]:
    """summary.json of each demo directory, by label."""
    return {
        _label(d, dirs): json.loads((d / "summary.json").read_text()) for d in dirs if (d / "summary.json").is_file()
    }


def _label(d: Path, dirs: list[Path]) -> str:
    """A directory's name, or its path where two share a name."""
    return d.name if [x.name for x in dirs].count(d.name) == 1 else str(d)


def _seeds(summary: dict) -> str:
    m = summary.get("machine", {})
    where = f"; {m['cpu']}, {m['threads']} threads, native bf16 {'yes' if m.get('native_bf16') else 'no'}" if m else ""
    quick = ", --quick" if summary.get("quick") else ""
    return f"seed {summary.get('seed', 0)}, world seed {summary.get('world_seed', 0)}{quick}{where}"


def _spread(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return ordered[0], median, ordered[-1]


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def glance_figure(summaries: dict[str, dict]) -> bytes | None:
    """Every stage's headline figure before -> after against its target; one dot per run, the arrow to the median;
    green where every run meets the target, red where one misses it; | the target, a diamond the ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [s["glance"] for s in summaries.values() if s.get("glance")]
    if not runs:
        return None
    labels = [r["label"].split(",")[0] if len(runs) > 1 else r["label"] for r in runs[0]]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(9, 0.42 * n + 1.0))
    for i in range(n):
        y = n - 1 - i
        rows = [run[i] for run in runs if i < len(run)]
        afters = [r["after"] for r in rows if r["after"] is not None]
        befores = [r["before"] for r in rows if r["before"] is not None]
        if not afters:
            continue
        before, after = _spread(befores)[1] if befores else None, _spread(afters)[1]
        colour = "tab:green" if all(r["met"] for r in rows) else "tab:red"
        if before is not None:
            ax.annotate("", xy=(after, y), xytext=(before, y), arrowprops=dict(arrowstyle="->", color=colour, lw=1.6))
            ax.plot([before], [y], "o", color="0.6", markersize=5)
        ax.plot(afters, [y] * len(afters), "o", color=colour, markersize=5 if len(afters) > 1 else 7, alpha=0.8)
        for r in rows:
            if r["bound"] is not None:
                ax.plot([r["bound"]], [y], "|", color="black", markersize=14, mew=2)
            if r.get("ceiling") is not None:
                ax.plot([r["ceiling"]], [y], "D", color="0.3", markersize=4, fillstyle="none")
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels[::-1], fontsize=9)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("rate (grey: before the stage, coloured: after; | target, diamond: win-rate ceiling)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("The pipeline at a glance" + (f" ({len(runs)} runs)" if len(runs) > 1 else ""), fontsize=11)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _targets_table(summaries: dict[str, dict]) -> str:
    """The targets, met or missed: each run's value, and with several runs min / median / max (met at the min)."""
    with_targets = {k: s for k, s in summaries.items() if s.get("targets")}
    if not with_targets:
        return ""
    first = next(iter(with_targets.values()))["targets"]
    many = len(with_targets) > 1
    head = "".join(f"<th>{html.escape(k)}</th>" for k in with_targets) + ("<th>min / median / max</th>" if many else "")
    body, met_all = [], 0
    for i, t in enumerate(first):
        rows = [s["targets"][i] for s in with_targets.values()]
        met = all(r["met"] for r in rows)
        met_all += met
        cells = "".join(f"<td class='{'met' if r['met'] else 'missed'}'>{_fmt(r['value'])}</td>" for r in rows)
        values = [r["value"] for r in rows if r["value"] is not None]
        if many and values:
            cells += "<td>" + " / ".join(_fmt(v) for v in _spread(values)) + "</td>"
        verdict = "met" if met else "missed"
        body.append(
            f"<tr><td>{t['stage']}</td><td>{t['metric']}</td><td>{html.escape(t['target'])}</td>{cells}"
            f"<td class='{verdict}'>{verdict}</td></tr>"
        )
    return (
        f"<h2>Targets: {met_all} of {len(first)} met{' in every run' if many else ''}</h2><table><tr><th>stage"
        f"</th><th>metric</th><th>target</th>{head}<th></th></tr>{''.join(body)}</table>"
    )


def _summary_table(dirs: list[Path]) -> str:
    summaries = _summaries(dirs)
    if not summaries:
        return ""
    keys: list[tuple[str, str]] = []
    for s in summaries.values():
        for stage, metrics in s["stages"].items():
            keys += [(stage, k) for k in metrics if (stage, k) not in keys]
    many = len(summaries) > 1
    head = "".join(f"<th>{html.escape(n)}</th>" for n in summaries) + ("<th>min / median / max</th>" if many else "")
    body = []
    for stage, k in keys:
        values = [s["stages"].get(stage, {}).get(k) for s in summaries.values()]
        cells = "".join(f"<td>{_fmt(v)}</td>" for v in values)
        numbers = [v for v in values if isinstance(v, int | float)]
        if many and numbers:
            cells += "<td>" + " / ".join(_fmt(float(v)) for v in _spread(numbers)) + "</td>"
        body.append(f"<tr><td>{stage}</td><td>{k}</td>{cells}</tr>")
    return (
        f"<h2>Held-out metrics</h2><table><tr><th>stage</th><th>metric</th>{head}</tr>{''.join(body)}</table>"
        "<p>SFT figures are greedy answers to the held-out people's questions (before: the base model); "
        "rewards, violations, win rates and KL are the oracle's judgement of 4 samples per question at "
        "temperature 1 against the SFT model; the reward model's accuracy is its agreement with the oracle "
        "on pairs of the SFT model's replies.</p>"
    )


def _frontier(dirs: list[Path]) -> str:
    parts = []
    for d in dirs:
        png = d / "frontier.png" if (d / "frontier.png").is_file() else d / "frontier" / "frontier.png"
        if png.is_file():
            parts.append(f"<h3>{html.escape(d.name)}</h3>{_img(png.read_bytes())}")
    return "<h2>Reward-KL frontier</h2>" + "".join(parts) if parts else ""


def _img(data: bytes) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def samples(run: Path, n: int = 3, max_new_tokens: int = 12) -> list[tuple[str, dict[str, str]]]:
    """Greedy answers of each stage's final model to the same held-out questions: [(question, {stage: text})]."""
    from llmstages.eval.lm import heldout_questions, show
    from llmstages.store import load_model, load_tokenizer

    made = json.loads((run / "demo.json").read_text()) if (run / "demo.json").is_file() else {}
    questions = heldout_questions(n, made.get("world_seed", 0))
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
        body = "".join(
            f"<tr><td>{html.escape(q)}</td>"
            + "".join(f"<td>{html.escape(r.get(s, ''))}</td>" for s in stages)
            + "</tr>"
            for q, r in rows
        )
        title = f"<h3>{html.escape(_label(d, dirs))}</h3>" if len(dirs) > 1 else ""
        parts.append(f"{title}<table><tr><th>question</th>{head}</tr>{body}</table>")
    if not parts:
        return ""
    return "<h2>Three held-out questions, the greedy answer of every stage</h2>" + "".join(parts)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1500px;margin:24px auto;padding:0 16px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}img{max-width:100%;margin:6px 0}h2{margin-top:28px}.met{color:#186a1b}
.missed{color:#b00020;font-weight:600}.seeds{color:#555;margin:2px 0}details{margin:4px 0 12px}"""


def check_target(dirs: list[str | Path], out: str | Path | None = None) -> None:
    """Before anything is written: the runs exist, and report.html and plots/ are new or this command's own."""
    from llmstages.outputs import claim_file

    for d in dirs:
        stage_runs(Path(d))
    target = Path(out) if out else Path(dirs[0]) / "report.html"
    claim_file(target, "--out", lambda p: p.read_text(errors="replace").startswith(HEAD))
    plots = target.parent / "plots"
    if plots.exists() and (not plots.is_dir() or not all(_is_our_plot(p) for p in plots.iterdir())):
        raise UserError(f"{plots} exists and holds other files than this command's plots; choose another --out")


HEAD = "<!doctype html><html><head><meta charset='utf-8'><title>llmstages report"
MARK = "llmstages report"
"""Written into every plot's PNG text chunk (Software): what tells this command's plots from a user's pictures."""


def _is_our_plot(path: Path) -> bool:
    """A PNG this command wrote: its text chunk (within the first few KiB, before the image data) names MARK."""
    if path.suffix != ".png" or not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.startswith(b"\x89PNG") and b"tEXtSoftware\x00" + MARK.encode() in head


def write_report(dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write report.html (and plots/*.png) into the first directory, or to `out`."""
    paths = [Path(d) for d in dirs]
    runs = {p: stage_runs(p) for p in paths}
    target = Path(out) if out else paths[0] / "report.html"
    names = [n for n in STAGE_ORDER if any(n in r for r in runs.values())]
    names += [n for r in runs.values() for n in r if n not in names]
    sections, pngs = [], {}  # everything is read and drawn first: a damaged run writes nothing
    for name in names:
        per_dir = {p.name if len(paths) > 1 else name: r[name] for p, r in runs.items() if name in r}
        png = plot_stage(name, per_dir)
        if png:
            pngs[f"{name.replace('/', '_')}.png"] = png
            sections.append(f"<h2>{html.escape(name)}</h2>{_img(png)}{_health(per_dir)}")
    title = "llmstages report: " + ", ".join(html.escape(str(p)) for p in paths)
    summaries = _summaries(paths)
    seeds = "".join(f"<p class='seeds'>{html.escape(k)}: {html.escape(_seeds(v))}</p>" for k, v in summaries.items())
    glance = glance_figure(summaries)
    if glance:
        pngs["glance.png"] = glance
    top = seeds + (_img(glance) if glance else "") + _targets_table(summaries) + _samples_html(paths)
    body = top + "".join(sections) + _summary_table(paths) + _frontier(paths)
    plots = target.parent / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for name, png in pngs.items():
        (plots / name).write_bytes(png)
    target.write_text(
        f"{HEAD}{title.removeprefix('llmstages report')}</title>"
        f"<style>{STYLE}</style></head><body><h1>{title}</h1>{body}</body></html>\n"
    )
    return target
