"""Policy evaluation: win rate, KL to a reference, and the `llmstages eval` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmstages.cli import main
from llmstages.data.chat import prompt_ids
from llmstages.data.oracle import oracle_reward
from llmstages.data.prompts import builtin_prompts
from llmstages.eval.policy import compare, pair_agreement, reply_logprob, win_rate
from llmstages.model import generate
from llmstages.store import load_model, load_tokenizer, save_model
from tests.helpers import builtin_base, tiny_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return builtin_base(tmp_path_factory.mktemp("eval") / "base")


def test_win_rate_counts_ties_half():
    assert win_rate(np.array([5.0, 3.0, 5.0, 4.0]), np.array([5.0, 5.0, 1.0, 4.0])) == (0.5 + 0 + 1 + 0.5) / 4


def test_reply_logprob_matches_the_sampler(base):
    """Log-probs of sampled replies recomputed in a padded batch == the ones the KV-cache sampler drew them with."""
    model, tok = load_model(base).eval(), load_tokenizer(base)
    prompts = [prompt_ids(m, tok) for m in builtin_prompts(0, 8)[1][:12]]
    out = generate(model, prompts, 6, temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    replies = [t[:n] for t, n in zip(out.tokens.tolist(), out.lengths.tolist())]
    assert len({len(p) for p in prompts}) > 1  # prompts of different lengths: left vs right padding is exercised
    torch.testing.assert_close(reply_logprob(model, prompts, replies, tok.pad_id), out.logprobs.sum(-1),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_compare_kl_is_zero_against_itself_and_positive_against_another(base):
    model, tok = load_model(base).eval(), load_tokenizer(base)
    prompts = builtin_prompts(0, 8)[1][:16]
    same = compare(model, tok, prompts, oracle_reward, reference=model, max_score=5.0, samples=2, max_new_tokens=4)
    assert same["kl"] == 0.0 and 0.0 <= same["win_rate"] <= 1.0 and 0.5 <= same["win_ceiling"] <= 1.0
    other = load_model(base).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    diff = compare(model, tok, prompts, oracle_reward, reference=other, samples=4, max_new_tokens=4)
    assert diff["kl"] > 0.0  # a Monte Carlo KL of two different models, 128 samples


def test_eval_cli_writes_json_and_refuses_a_foreign_reference(base, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(base), "--reference", str(base), "--samples", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"reward", "win_rate", "kl", "violation_rate", "win_ceiling", "length"} <= set(result)
    model = load_model(base)
    other = save_model(model, tmp_path / "other", tiny_tokenizer())
    assert main(["eval", "--model", str(base), "--reference", str(other)]) == 2
    assert "tokenizer differs" in capsys.readouterr().err
    assert main(["eval", "--model", str(base), "--reward", "no_such_module:fn"]) == 2


def test_pair_agreement_by_hand():
    truth = np.array([5.0, 3.0, 3.0, 1.0, 1.0, 1.0])  # two prompts of three replies
    judged = np.array([0.9, 0.1, 0.5, 0.0, 0.0, 0.0])
    # prompt 1 pairs with different truth: (0,1) right, (0,2) right; (1,2) tie in truth: skipped. prompt 2: none
    assert pair_agreement(judged, truth, 3) == (1.0, 2)
    assert pair_agreement(np.array([0.1, 0.9, 0.1, 0, 0, 0]), truth, 3) == (0.25, 2)  # one wrong, one judge tie


def test_label_agreement_counts_only_pairs_the_judge_separates(tmp_path, capsys):
    from llmstages.data.builtin import World
    from llmstages.data.tasks import QUESTIONS

    p = World(0).people[0]
    q = QUESTIONS["town"][0].format(n=p.name)
    rows = [
        {"prompt": q, "chosen": p.town, "rejected": f"{p.town}, really"},  # agrees with the oracle
        {"prompt": q, "chosen": f"{p.town}, very nice", "rejected": p.town},  # disagrees
        {"prompt": q, "chosen": f"{p.town}, really", "rejected": f"{p.town}, very nice"},
    ]  # a tie: not counted
    labels = tmp_path / "pairs.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))  # fmt: skip
    out = tmp_path / "agreement.json"
    assert main(["eval", "--labels", str(labels), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["label_agreement"], result["label_pairs"], result["labelled_pairs"]) == (0.5, 2, 3)
    assert main(["eval"]) == 2 and "give --model" in capsys.readouterr().err
