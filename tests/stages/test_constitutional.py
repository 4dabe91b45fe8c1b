"""Constitutional AI: prompts as the constitution writes them, option probabilities read in both orders, the
whole loop from the CLI with resume, bad input."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from llmstages.cli import main
from llmstages.data.constitution import Principle
from llmstages.stages import constitutional as cai
from llmstages.store import load_tokenizer
from tests.helpers import builtin_base

SHORTER = Principle("concise", "Is the answer '{response}' short?", "Shorten the answer '{response}'",
                    "Which answer is shorter, (A) '{a}' or (B) '{b}'?")  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return builtin_base(tmp_path_factory.mktemp("cai") / "base")


class ShorterJudge(nn.Module):
    """A stub feedback model with known preferences: at the last position it gives the option of the shorter
    answer logit `margin`, plus `bias` to option A whatever the order (a position bias)."""

    def __init__(self, tok, option_ids, margin: float, bias: float) -> None:
        super().__init__()
        self.tok, self.ids, self.margin, self.bias = tok, option_ids, margin, bias
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx, mask=None):
        logits = torch.zeros(*idx.shape, self.tok.vocab_size)
        for k in range(idx.size(0)):
            n = int(mask[k].sum())
            a, b = re.findall(r"'([^']*)'", self.tok.decode(idx[k, :n].tolist()))[:2]
            logits[k, n - 1, self.ids[0 if len(a) < len(b) else 1]] += self.margin
            logits[k, n - 1, self.ids[0]] += self.bias
        return logits


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_option_reading_cancels_position_bias(base):
    tok = load_tokenizer(base)
    ids = cai.option_token_ids(tok, ("A", "B"), "test")
    judge = ShorterJudge(tok, ids, margin=2.0, bias=1.0)
    a, b = ["Oakfield", "red, very nice"], ["Oakfield, as always", "red"]
    p_a, per, bias = cai.preference(judge, tok, [SHORTER], ids, ["q1", "q2"], a, b)
    # closed form: shorter one first -> P(A) = sigmoid(2 + 1); shorter one second -> P(B) = sigmoid(2 - 1)
    right = (sigmoid(3.0) + sigmoid(1.0)) / 2
    np.testing.assert_allclose(p_a, [right, 1 - right], rtol=1e-5)
    assert p_a[0] > 0.5 > p_a[1]  # the labels come out as the stub prefers, in both orders
    assert bias == pytest.approx((sigmoid(3.0) + sigmoid(-1.0)) / 2 - 0.5, rel=1e-5)
    np.testing.assert_allclose(per["concise"], p_a)


def test_option_tokens_must_be_single_tokens(base):
    tok = load_tokenizer(base)
    with pytest.raises(Exception, match="no single token for the option 'first answer'"):
        cai.option_token_ids(tok, ("first answer", "B"), "feedback model X")


def _cai(base, out, *extra):
    return main(["cai", "run", f"model.path={base}", f"out_dir={out}", "max_prompts=24", "revise.feedback_tokens=4",
                 "label.max_new_tokens=3",
                 "label.min_probability=0.5", "run.sft=[train.max_steps=2,train.eval_every=2,train.save_every=2]",
                 "run.dpo=[train.max_steps=2,train.eval_every=2,train.save_every=2,data.val_fraction=0]",
                 *extra])  # fmt: skip


def test_run_writes_every_step_and_resumes(base, tmp_path, monkeypatch):
    from llmstages.stages import sft

    real = sft.main

    def broken(cfg, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "main", broken)
    assert _cai(base, tmp_path) == 130  # stopped after the revise step
    chains = [json.loads(line) for line in (tmp_path / "revise" / "chains.jsonl").read_text().splitlines()]
    assert len(chains) == 24 and all(len(c["rounds"]) == 1 for c in chains)
    assert {"principle", "critique", "revision"} <= set(chains[0]["rounds"][0])
    before = (tmp_path / "revise" / "sft.jsonl").read_bytes()
    monkeypatch.setattr(sft, "main", real)
    assert _cai(base, tmp_path) == 0  # resumes: revise is reused, the rest runs
    assert (tmp_path / "revise" / "sft.jsonl").read_bytes() == before
    pairs = [json.loads(line) for line in (tmp_path / "label" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(0.5 <= p["probability"] <= 1 and p["chosen"] != p["rejected"] for p in pairs)
    assert (tmp_path / "dpo" / "final" / "config.json").is_file()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == ["revise", "label"]


def test_run_can_align_with_a_reward_model_and_ppo(base, tmp_path):
    assert _cai(base, tmp_path, "run.align=ppo",
                "run.reward=[train.max_steps=2,train.eval_every=2,train.save_every=2,data.val_fraction=0]",
                "run.ppo=[train.max_steps=2,train.eval_every=2,train.save_every=2,ppo.rollout_size=8,"
                "ppo.minibatches=1,ppo.ppo_epochs=1,ppo.max_new_tokens=3]") == 0  # fmt: skip
    assert (tmp_path / "reward" / "final" / "score_head.safetensors").is_file()
    assert (tmp_path / "ppo" / "final" / "config.json").is_file()
    assert not (tmp_path / "dpo").exists()


def test_feedback_model_with_its_own_tokenizer(base, tmp_path):
    """The feedback model may tokenize differently from the policy: requests and replies cross as text."""
    from llmstages.data.builtin import builtin_corpus
    from llmstages.data.text import tokenizer_hash
    from llmstages.data.tokenizer import train_bpe
    from llmstages.model import GPT, preset
    from llmstages.store import save_model

    tok = train_bpe(builtin_corpus(0, 0.1), 500)
    assert tokenizer_hash(tok) != tokenizer_hash(load_tokenizer(base))
    torch.manual_seed(1)
    model = GPT(preset("llama_tiny", vocab_size=tok.vocab_size, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                       block_size=128, eos_token_id=tok.eos_id))  # fmt: skip
    feedback = save_model(model, tmp_path / "feedback", tok)
    assert main(["cai", "label", f"model.path={base}", f"feedback.path={feedback}", f"out_dir={tmp_path / 'out'}",
                 "max_prompts=16", "label.max_new_tokens=3", "label.min_probability=0.5"]) == 0  # fmt: skip
    assert (tmp_path / "out" / "label" / "pairs.jsonl").read_text().count("\n") > 0


def test_bad_input(base, tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("principles: []\n")
    assert main(["cai", "revise", f"model.path={base}", f"constitution={empty}", f"out_dir={tmp_path / 'a'}"]) == 2
    assert "empty.yaml: a constitution needs a non-empty list" in capsys.readouterr().err
    wordy = tmp_path / "wordy.yaml"
    wordy.write_text("options: ['first answer', 'second answer']\nprinciples:\n"
                     "  - {name: x, critique: c, revision: r, comparison: '{a} or {b}'}\n")  # fmt: skip
    assert main(["cai", "label", f"model.path={base}", f"constitution={wordy}", f"out_dir={tmp_path / 'b'}"]) == 2
    assert "no single token for the option 'first answer'" in capsys.readouterr().err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("")
    assert main(["cai", "revise", f"model.path={base}", f"data.path=[{prompts}]", f"out_dir={tmp_path / 'c'}"]) == 2
    assert "prompts.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
