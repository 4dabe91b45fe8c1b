"""Constitutional AI (Bai et al. 2022): critique-and-revision SFT data, then AI-feedback preference labels.

    llmstages cai revise --config configs/cai/builtin.yaml   # responses -> critiques -> revisions (SFT data)
    llmstages cai label  --config configs/cai/builtin.yaml   # response pairs -> the feedback model's preference
    llmstages cai run    --config configs/cai/builtin.yaml   # revise -> SFT -> label -> DPO (or RM + PPO)

revise: for each prompt the policy samples a response; for `revise.rounds` rounds the feedback model is asked to
        critique it against a principle and to revise it (greedy). The chains go to `revise/chains.jsonl`, the
        final revisions to `revise/sft.jsonl` (chat records `llmstages sft` reads).
label:  for each prompt the policy samples two responses; for every principle the feedback model answers the
        comparison question in both orders, and its preference is read from the probabilities of the two option
        tokens (not from sampled text): p(a) = [P(A | a, b) + P(B | b, a)] / 2, which cancels position bias,
        averaged over principles. Pairs go to `label/pairs.jsonl` ({"prompt","chosen","rejected",
        "probability"}), which `llmstages dpo` and `llmstages reward` read.
run:    the whole loop, each step's output kept in `out_dir` and reused when present, so a stopped run resumes.
        The pairs are sampled from the model fine-tuned on the revisions (the paper) or, with
        `label.sample_from=start`, from the starting policy; DPO (or the reward model and PPO) starts from the
        model fine-tuned on the revisions either way.

The feedback model is any model directory and defaults to the policy itself (self-improvement). Nothing here
looks at the built-in oracle: it only measures the outcome afterwards (`llmstages eval`).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmstages.config import CAIConfig, save_config
from llmstages.data.chat import Message, prompt_ids, right_pad, tokenize_conversation
from llmstages.data.constitution import Constitution, Principle, load_constitution
from llmstages.data.lengths import check_room, fit_prompts
from llmstages.data.prompts import prompt_sets
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model import GPT
from llmstages.model.generate import sample_many
from llmstages.outputs import claim_run_dir, start_run_dir
from llmstages.store import load_config, load_model, load_tokenizer
from llmstages.train.start import resolve_device

RECIPES = Path(__file__).resolve().parent.parent / "configs"
BATCH = 128


# -- asking a model --------------------------------------------------------------------------------------------
def ask(model: GPT, tok: Tokenizer, requests: Sequence[str], max_new_tokens: int) -> list[str]:
    """The model's greedy reply to each request, sent as one user turn (a long one cut from the left to leave room
    for the reply: data/lengths.py)."""
    ids = [prompt_ids([{"role": "user", "content": r}], tok) for r in requests]
    ids, _ = fit_prompts(ids, max_new_tokens, model.config.block_size, "revise.feedback_tokens")
    return [t.strip() for t in sample_many(model, tok, ids, max_new_tokens, 0.0, batch_size=BATCH)[1]]


def option_token_ids(tok: Tokenizer, options: Sequence[str], where: str) -> list[int]:
    """The token that starts each option when it is the whole assistant reply; each option must be one token
    of its own (otherwise its probability cannot be read from one next-token distribution)."""
    ids = []
    for opt in options:
        ex = tokenize_conversation([{"role": "user", "content": "?"}, {"role": "assistant", "content": opt}], tok)
        reply = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100 and t != tok.eos_id]
        if len(reply) != 1:
            raise UserError(
                f"{where}: its tokenizer has no single token for the option '{opt}' (it takes "
                f"{len(reply)} tokens); choose other options in the constitution"
            )
        ids.append(reply[0])
    if len(set(ids)) != len(ids):
        raise UserError(f"{where}: the options {list(options)} map to the same token")
    return ids


@torch.no_grad()
def option_probabilities(model: GPT, tok: Tokenizer, requests: Sequence[str], option_ids: Sequence[int]) -> np.ndarray:
    """(N, len(option_ids)): the next-token probabilities of the option tokens after each request's assistant
    tag, renormalised over the options. A request longer than the context is cut from the left (the tag is kept)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(requests), BATCH):
        rows = [prompt_ids([{"role": "user", "content": r}], tok) for r in requests[s : s + BATCH]]
        context = getattr(getattr(model, "config", None), "block_size", None)  # None: a judge without a context
        if context is not None:
            rows, _ = fit_prompts(rows, 0, context, "the comparison request")
        ids, mask = right_pad(rows, tok.pad_id)
        logits = model(ids.to(device), mask=mask.to(device)).float()
        last = logits[torch.arange(len(rows)), mask.sum(-1).to(device) - 1]  # (B, V) after the assistant tag
        out.append(torch.softmax(last[:, list(option_ids)], -1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def sample(
    model: GPT,
    tok: Tokenizer,
    prompts: Sequence[list[Message]],
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    key: str = "max_new_tokens",
) -> list[list[str]]:
    """`n` sampled responses per prompt, each prompt cut from the left to leave room for them (`key` names the
    setting of `max_new_tokens` in errors)."""
    ids = [prompt_ids(m, tok) for m in prompts for _ in range(n)]
    ids, _ = fit_prompts(ids, max_new_tokens, model.config.block_size, key)
    texts = sample_many(model, tok, ids, max_new_tokens, temperature, seed, BATCH)[1]
    return [[t.strip() for t in texts[i * n : (i + 1) * n]] for i in range(len(prompts))]


# -- the two phases --------------------------------------------------------------------------------------------
@dataclass
class Models:
    """The policy and the feedback model, each with its own tokenizer (they may differ: requests and replies
    cross between them as text)."""

    policy: GPT
    policy_tok: Tokenizer
    feedback: GPT
    feedback_tok: Tokenizer
    feedback_path: str


def revise(
    cfg: CAIConfig, m: Models, prompts: list[list[Message]], constitution: Constitution, out: Path
) -> dict[str, float]:
    """Responses, then `rounds` of critique and revision each; writes chains.jsonl and sft.jsonl into `out`."""
    r = cfg.revise
    if r.choose not in ("all", "random"):
        raise UserError(f"revise.choose must be 'all' or 'random', got '{r.choose}'")
    rng = random.Random(cfg.seed)
    principles = list(constitution.principles)
    first_replies = sample(
        m.policy, m.policy_tok, prompts, 1, r.temperature, r.max_new_tokens, cfg.seed, "revise.max_new_tokens"
    )
    current = [s[0] for s in first_replies]
    first = list(current)
    texts = [m[-1]["content"] for m in prompts]
    chains: list[list[dict]] = [[] for _ in prompts]
    for k in range(r.rounds):
        picked = [principles[k % len(principles)] if r.choose == "all" else rng.choice(principles) for _ in prompts]
        asks = [p.critique_request(t, c) for p, t, c in zip(picked, texts, current)]
        critiques = ask(m.feedback, m.feedback_tok, asks, r.feedback_tokens)
        asks = [p.revision_request(t, c, q) for p, t, c, q in zip(picked, texts, current, critiques)]
        revisions = ask(m.feedback, m.feedback_tok, asks, r.feedback_tokens)
        for i, (p, q, v) in enumerate(zip(picked, critiques, revisions)):
            chains[i].append({"principle": p.name, "critique": q, "revision": v})
            if v:  # an empty revision keeps the response it was asked to revise
                current[i] = v
    rows = [
        {"prompt": m, "response": f, "rounds": c, "final": v} for m, f, c, v in zip(prompts, first, chains, current)
    ]
    write_jsonl(out / "chains.jsonl", rows)
    write_jsonl(
        out / "sft.jsonl",
        [{"messages": [*m, {"role": "assistant", "content": v}]} for m, v in zip(prompts, current) if v],
    )
    changed = float(np.mean([f != v for f, v in zip(first, current)]))
    return {
        "prompts": len(prompts),
        "changed": changed,
        "length_before": float(np.mean([len(f) for f in first])),
        "length_after": float(np.mean([len(v) for v in current])),
    }


def preference(
    feedback: GPT,
    tok: Tokenizer,
    principles: list[Principle],
    option_ids: list[int],
    prompts: list[str],
    a: list[str],
    b: list[str],
) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """(p(a preferred) averaged over principles, per principle, position bias): each comparison asked with a
    first and with b first; position bias = mean P(first option) - 0.5 over both orders."""
    per, first_share = {}, []
    for p in principles:
        ab = option_probabilities(
            feedback, tok, [p.comparison_request(t, x, y) for t, x, y in zip(prompts, a, b)], option_ids
        )
        ba = option_probabilities(
            feedback, tok, [p.comparison_request(t, y, x) for t, x, y in zip(prompts, a, b)], option_ids
        )
        per[p.name] = (ab[:, 0] + ba[:, 1]) / 2
        first_share += [ab[:, 0].mean(), ba[:, 0].mean()]
    return np.mean(list(per.values()), axis=0), per, float(np.mean(first_share) - 0.5)


def label(
    cfg: CAIConfig, m: Models, prompts: list[list[Message]], constitution: Constitution, out: Path
) -> dict[str, float]:
    """`label.samples` responses per prompt, every two distinct ones labelled by the feedback model; writes
    pairs.jsonl into `out`."""
    lab = cfg.label
    principles = constitution.pick(lab.principles)
    option_ids = option_token_ids(m.feedback_tok, constitution.options, f"feedback model {m.feedback_path}")
    if lab.samples < 2:
        raise UserError(f"label.samples must be at least 2, got {lab.samples}")
    replies = sample(
        m.policy, m.policy_tok, prompts, lab.samples, lab.temperature, lab.max_new_tokens, cfg.seed + 1,
        "label.max_new_tokens",
    )  # fmt: skip
    keep = []  # (prompt index, a, b): every two distinct non-empty responses to the same prompt
    for i, group in enumerate(replies):
        distinct = list(dict.fromkeys(r for r in group if r))
        keep += [(i, x, y) for n, x in enumerate(distinct) for y in distinct[n + 1 :]]
    if not keep:
        raise UserError("the policy's responses were identical (or empty) for every prompt: nothing to label")
    texts = [prompts[i][-1]["content"] for i, _, _ in keep]
    a, b = [x for _, x, _ in keep], [y for _, _, y in keep]
    p_a, per, bias = preference(m.feedback, m.feedback_tok, principles, option_ids, texts, a, b)
    rows = []
    for j, (i, x, y) in enumerate(keep):
        first = p_a[j] >= 0.5
        prob = float(max(p_a[j], 1 - p_a[j]))
        if prob >= lab.min_probability:
            principle_probs = {k: round(float(v[j] if first else 1 - v[j]), 4) for k, v in per.items()}
            rows.append(
                {
                    "prompt": prompts[i],
                    "chosen": x if first else y,
                    "rejected": y if first else x,
                    "probability": round(prob, 4),
                    "principles": principle_probs,
                }
            )
    if not rows:
        raise UserError(f"no pair reached label.min_probability={lab.min_probability}; lower it")
    write_jsonl(out / "pairs.jsonl", rows)
    return {
        "pairs_sampled": len(keep),
        "pairs": len(rows),
        "mean_probability": float(np.mean([r["probability"] for r in rows])),
        "position_bias": bias,
    }


# -- plumbing --------------------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> None:
    """All rows or nothing: written to a temporary file, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _prompts(cfg: CAIConfig) -> list[list[Message]]:
    prompts = prompt_sets(cfg.data, cfg.world_seed)[0]
    return prompts[: cfg.max_prompts] if cfg.max_prompts > 0 else prompts


def _constitution(cfg: CAIConfig) -> Constitution:
    return load_constitution(cfg.constitution or RECIPES / "cai" / "constitution_builtin.yaml")


def _models(cfg: CAIConfig, policy_path: str, device: torch.device) -> Models:
    """The policy at `policy_path` and the feedback model (`feedback.path`, by default `model.path`)."""
    policy = load_model(policy_path, device=device).eval()
    tok = load_tokenizer(policy_path)
    fb_path = cfg.feedback.path or cfg.model.path
    if fb_path == policy_path:
        return Models(policy, tok, policy, tok, fb_path)
    return Models(policy, tok, load_model(fb_path, device=device).eval(), load_tokenizer(fb_path), fb_path)


def _log(out: Path, step: str, stats: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **stats}) + "\n")


def _claim(cfg: CAIConfig) -> Path:
    """The CAI run folder: new, empty or an earlier `cai` run (whose finished steps are reused); marked as one."""
    out = Path(cfg.out_dir)
    claim_run_dir(out, "cai", resume=True, overwrite=False)
    start_run_dir(out, "cai", overwrite=False)
    return out


def _check(cfg: CAIConfig) -> tuple[Constitution, list[list[Message]], torch.device]:
    if not cfg.model.path:
        raise UserError("set model.path to the policy (usually the SFT model's final/ directory)")
    if cfg.run.align not in ("dpo", "ppo"):
        raise UserError(f"run.align must be 'dpo' or 'ppo', got '{cfg.run.align}'")
    if cfg.label.sample_from not in ("revised", "start"):
        raise UserError(f"label.sample_from must be 'revised' or 'start', got '{cfg.label.sample_from}'")
    context = load_config(cfg.model.path).block_size  # room for every reply in the contexts, checked up front
    check_room(cfg.revise.max_new_tokens, context, "revise.max_new_tokens")
    check_room(cfg.label.max_new_tokens, context, "label.max_new_tokens")
    feedback = load_config(cfg.feedback.path).block_size if cfg.feedback.path else context
    check_room(cfg.revise.feedback_tokens, feedback, "revise.feedback_tokens")
    return _constitution(cfg), _prompts(cfg), resolve_device(cfg.device)


def main_revise(cfg: CAIConfig, progress: bool = True) -> dict[str, float]:
    constitution, prompts, device = _check(cfg)
    models = _models(cfg, cfg.model.path, device)
    out = _claim(cfg)
    stats = revise(cfg, models, prompts, constitution, out / "revise")
    _log(out, "revise", stats)
    if progress:
        print(f"cai revise: {stats['prompts']} prompts, {stats['changed']:.0%} changed by revision -> {out / 'revise'}")
    return stats


def main_label(cfg: CAIConfig, progress: bool = True, policy_path: str | None = None) -> dict[str, float]:
    constitution, prompts, device = _check(cfg)
    models = _models(cfg, policy_path or cfg.model.path, device)
    out = _claim(cfg)
    stats = label(cfg, models, prompts, constitution, out / "label")
    _log(out, "label", stats)
    if progress:
        print(
            f"cai label: {stats['pairs']} of {stats['pairs_sampled']} pairs labelled (mean probability "
            f"{stats['mean_probability']:.2f}, position bias {stats['position_bias']:+.2f}) -> "
            f"{out / 'label'}"
        )
    return stats


def main_run(cfg: CAIConfig, progress: bool = True) -> dict[str, str]:
    """revise -> SFT on the revisions -> label samples of the SFT'd policy -> DPO (or reward model + PPO)."""
    from llmstages.stages import STAGES

    _check(cfg)
    out = _claim(cfg)
    save_config(cfg, out / "config.yaml")

    def done(run: Path) -> bool:
        return (run / "final" / "config.json").is_file()

    def say(text: str) -> None:
        if progress:
            print(f"cai run: {text}")

    if (out / "revise" / "sft.jsonl").is_file():
        say("revise: reusing revise/sft.jsonl")
    else:
        main_revise(cfg, progress)

    def step(stage: str, recipe: str, model: str, overrides: list[str], data: Path | None = None) -> None:
        """A shipped recipe with the run's overrides (`run.<stage>`), chained into this folder."""
        if done(out / stage):
            return
        c = STAGES[stage].chained(recipe, overrides, out / stage, cfg.seed, cfg.world_seed, model)
        if data is not None:
            c.data.path = [str(data)]
        if stage == "ppo":
            c.reward.model = str(out / "reward" / "final")
        STAGES[stage].main(c, progress)

    step("sft", "sft/lora.yaml", cfg.model.path, cfg.run.sft, out / "revise" / "sft.jsonl")
    policy = str(out / "sft" / "final")
    if (out / "label" / "pairs.jsonl").is_file():
        say("label: reusing label/pairs.jsonl")
    else:
        main_label(cfg, progress, policy_path=policy if cfg.label.sample_from == "revised" else cfg.model.path)
    pairs = out / "label" / "pairs.jsonl"
    if cfg.run.align == "dpo":
        step("dpo", "dpo/lora.yaml", policy, cfg.run.dpo, pairs)
    else:
        step("reward", "reward/lora.yaml", policy, cfg.run.reward, pairs)
        step("ppo", "ppo/lora.yaml", policy, cfg.run.ppo)
    final = out / cfg.run.align / "final"
    say(f"done; the aligned policy is {final}")
    return {"revise": str(out / "revise"), "sft": policy, "label": str(pairs), "final": str(final)}
