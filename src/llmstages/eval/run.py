"""`llmstages eval`: a model judged on held-out data (perplexity, task accuracy, reward, win rate and KL against a
reference, a judge's agreement), and preference files' labels checked against a reward; printed, and written as
JSON with --out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from llmstages.data.text import iter_documents
from llmstages.errors import UserError
from llmstages.eval import lm
from llmstages.eval.policy import evaluate_dir, label_agreement
from llmstages.model.generate import check_temperature
from llmstages.outputs import claim_file, write_file
from llmstages.store import load_model, load_tokenizer
from llmstages.train.start import resolve_device


def _is_eval_json(path: Path) -> bool:
    """An earlier `eval --out` file, which a new one may replace."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"model", "reference"} <= set(data)


def evaluate(
    model_path: str | None,
    labels: Sequence[str] = (),
    reference: str | None = None,
    reward: str = "llmstages.data.oracle:oracle_reward",
    judge: str | None = None,
    data: Sequence[str] = (),
    perplexity: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    show: int = 0,
    samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    seed: int = 0,
    world_seed: int = 0,
    out: str | None = None,
    device: str = "auto",
) -> dict[str, float]:
    """The figures asked for, by name. `perplexity`/`tasks` None: not asked; an empty list: the built-in data."""
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    check_temperature(temperature, "--temperature")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if out:
        claim_file(Path(out), "--out", _is_eval_json)
    if not model_path and not labels:
        raise UserError("give --model (a model to judge) or --labels (a preference file to check), or both")
    wants_lm = perplexity is not None or tasks is not None or show
    if wants_lm and not model_path:
        raise UserError("--perplexity, --tasks and --show judge a model: give --model")
    result = label_agreement(labels, reward, world_seed) if labels else {}
    where = str(resolve_device(device, "--device")) if model_path else "cpu"
    if model_path and wants_lm:
        model, tok = load_model(model_path, device=where).eval(), load_tokenizer(model_path)
        if perplexity is not None:
            docs = list(iter_documents(perplexity)) if perplexity else lm.builtin_heldout_text(world_seed)
            result.update(lm.perplexity(model, tok, docs))
        if tasks is not None:
            result.update(lm.task_accuracy(model, tok, tasks, world_seed))
        if show:
            questions = lm.heldout_questions(show, world_seed)
            for q, a in zip(questions, lm.show(model, tok, questions)):
                print(f"{q!r} -> {a!r}")
    if model_path and (not wants_lm or reference or judge):
        result.update(
            evaluate_dir(
                model_path,
                reference,
                reward,
                data,
                samples,
                temperature,
                max_new_tokens,
                seed,
                where,
                judge,
                world_seed,
            )
        )
    if not result:
        return result
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4g}")
    if out:
        write_file(Path(out), json.dumps({"model": model_path, "reference": reference, **result}, indent=1))
        print(f"wrote {out}")
    return result
