"""The DPO stage end to end: every loss runs, the first evaluation sits at log 2 (policy == reference), the
preferred replies gain probability, resume is exact, and bad input is refused cleanly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmstages.cli import main
from llmstages.monitor.metrics import read_metrics
from llmstages.peft import apply_lora
from llmstages.store import load_model, load_tokenizer, save_model
from tests.helpers import builtin_base, stop_after_step, trace

FAST = [
    "train.max_steps=8", "train.batch_size=4", "train.seq_len=48", "train.log_every=1", "train.eval_every=4",
    "train.save_every=100", "train.warmup_steps=1", "train.precision=fp32", "train.lr=3e-3",
]  # fmt: skip


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    base = builtin_base(root / "base")
    model, tok = load_model(base), load_tokenizer(base)
    apply_lora(model, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_model(model, root / "sft-lora", tok)  # an SFT model that carries a LoRA: merged before DPO
    towns = ["Oakfield", "Millbrook", "Ashford", "Riverton"]
    rows = [{"prompt": f"Where does person {i} live?", "chosen": towns[i % 4], "rejected": f"{towns[i % 4]} or maybe"}
            for i in range(40)]  # fmt: skip
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _dpo(root, out, *extra):
    return main(["dpo", f"model.path={root / 'base'}", f"data.path={root / 'prefs.jsonl'}", f"out_dir={out}",
                 *FAST, *extra])  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        ["peft.method=lora"],
        ["peft.method=none"],
        ["peft.method=lora", "ref.precompute=true"],
        ["dpo.loss=ipo", "peft.method=lora"],
        ["dpo.loss=cdpo", "peft.method=lora"],
        ["dpo.loss=hinge", "peft.method=lora"],
        ["dpo.loss=simpo", "peft.method=lora", "dpo.beta=2"],
        ["dpo.loss=orpo", "peft.method=lora"],
    ],
    ids=["lora", "full", "precompute", "ipo", "cdpo", "hinge", "simpo", "orpo"],
)
def test_losses_run_and_learn_the_preference(setup_dirs, tmp_path, extra):
    assert _dpo(setup_dirs, tmp_path, *extra) == 0
    records = read_metrics(tmp_path)
    start, end = records[0], [r for r in records if "val_margin" in r][-1]
    if "dpo.loss=" not in " ".join(extra) or "dpo.loss=cdpo" in extra:
        assert math.isclose(start["val_loss"], math.log(2), rel_tol=1e-4)  # policy == reference at step 0
        assert abs(start["val_margin"]) < 1e-5
    if "dpo.loss=hinge" in extra:
        assert math.isclose(start["val_loss"], 1.0, rel_tol=1e-4)  # relu(1 - beta * 0) at step 0
    assert end["val_margin"] > start["val_margin"]  # the chosen replies gained on the rejected ones
    assert (tmp_path / "final/model.safetensors").is_file()


def test_no_metric_is_named_as_a_kl(setup_dirs, tmp_path):
    """DPO scores the dataset's replies, not the policy's samples: its log-ratios are logged as what they are (and
    go negative as the rejected replies are pushed down), never as a KL."""
    assert _dpo(setup_dirs, tmp_path, "peft.method=lora") == 0
    records = read_metrics(tmp_path)
    assert not [k for r in records for k in r if "kl" in k.lower()]
    steps = [r for r in records if "logratio/rejected" in r and r.get("step", 0) > 0]
    assert steps and steps[-1]["logratio/rejected"] < 0  # the rejected replies lost likelihood against the reference
    assert steps[-1]["logratio/chosen"] > steps[-1]["logratio/rejected"]


def test_reference_of_a_lora_sft_model_is_the_sft_model(setup_dirs, tmp_path):
    """The SFT LoRA is merged, so at step 0 policy == reference exactly (loss log 2), not base vs SFT."""
    assert main(["dpo", f"model.path={setup_dirs / 'sft-lora'}", f"data.path={setup_dirs / 'prefs.jsonl'}",
                 f"out_dir={tmp_path}", *FAST, "train.max_steps=1", "peft.method=lora"]) == 0  # fmt: skip
    assert math.isclose(read_metrics(tmp_path)[0]["val_loss"], math.log(2), rel_tol=1e-4)


def test_exact_resume(setup_dirs, tmp_path, monkeypatch):
    assert _dpo(setup_dirs, tmp_path / "a", "peft.method=lora") == 0
    stop_after_step(monkeypatch, 3)
    assert _dpo(setup_dirs, tmp_path / "b", "peft.method=lora") == 130
    monkeypatch.undo()
    assert _dpo(setup_dirs, tmp_path / "b", "peft.method=lora", "resume=true") == 0

    assert trace(tmp_path / "b", "loss") == trace(tmp_path / "a", "loss")


def test_bad_input(setup_dirs, tmp_path, capsys):
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n" + json.dumps(
        {"prompt": "q", "chosen": "x", "rejected": "x"}) + "\n")  # fmt: skip
    code = main(["dpo", f"model.path={setup_dirs / 'base'}", f"data.path={same}", f"out_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 2 and "same.jsonl:1: preference record has no 'rejected'" in err
    code = _dpo(setup_dirs, tmp_path / "o", "dpo.loss=rso")
    assert code == 2 and "dpo.loss must be one of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_builtin_pairs_when_no_data_is_given(setup_dirs, tmp_path):
    """Without data.path, pairs are the starting model's own samples labelled by the built-in oracle."""
    assert main(["dpo", f"model.path={setup_dirs / 'base'}", f"out_dir={tmp_path}", *FAST, "train.max_steps=2",
                 "peft.method=lora"]) == 0  # fmt: skip
    assert read_metrics(tmp_path)[0]["pairs"] > 0


def test_builtin_pairs_put_the_oracles_favourite_first(setup_dirs, monkeypatch):
    from llmstages.data.builtin import World
    from llmstages.data.oracle import parse_question
    from llmstages.rl import pairs as builtin_data
    from llmstages.store import load_model, load_tokenizer

    world = World(0)
    prompts, _ = builtin_data.builtin_prompts(0, 8)

    def fake_samples(model, tok, ids, max_new_tokens, temperature, generator=None):
        responses, ended = [], []
        for m in prompts:  # two samples per prompt: a hedged reply first, then the clean true one
            name, attribute = parse_question(m[-1]["content"])
            truth = world.by_name[name].get(attribute)
            responses += [f"{truth} or maybe not", truth]
            ended += [True, True]
        return [[1]] * len(responses), responses, ended

    monkeypatch.setattr(builtin_data, "sample_replies", fake_samples)
    pairs = builtin_data.builtin_preference_pairs(load_model(setup_dirs / "base"), load_tokenizer(setup_dirs / "base"))
    assert len(pairs) == len(prompts)
    assert all(" or " not in p.chosen and " or maybe" in p.rejected for p in pairs)


def test_builtin_pairs_from_more_samples_take_every_differently_scored_pair(setup_dirs, monkeypatch):
    from llmstages.data.builtin import World
    from llmstages.data.oracle import parse_question
    from llmstages.rl import pairs as builtin_data
    from llmstages.store import load_model, load_tokenizer

    world = World(0)
    prompts, _ = builtin_data.builtin_prompts(0, 8)

    def fake_samples(model, tok, ids, max_new_tokens, temperature, generator=None):
        responses = []
        for m in prompts:  # four samples: clean (5), two different banned tails (3 each), the clean one again
            name, attribute = parse_question(m[-1]["content"])
            truth = world.by_name[name].get(attribute)
            responses += [truth, f"{truth}, really", f"{truth}, very nice", truth]
        return [[1]] * len(responses), responses, [True] * len(responses)

    monkeypatch.setattr(builtin_data, "sample_replies", fake_samples)
    model, tok = load_model(setup_dirs / "base"), load_tokenizer(setup_dirs / "base")
    pairs = builtin_data.builtin_preference_pairs(model, tok, samples=4)
    # per prompt: clean over each of the two tails; the tie between the tails and the repeated clean reply add none
    assert len(pairs) == 2 * len(prompts)
    assert all(p.chosen == p.chosen.split(",")[0] and "," in p.rejected for p in pairs)


def test_cdpo_takes_each_pairs_probability_as_its_soft_label():
    """cDPO with per-pair flip probabilities eps = 1 - probability, against the formula written out."""
    import math

    from llmstages.config import DPOArgs
    from llmstages.stages.dpo import pair_loss

    pw, pl = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])
    rw, rl = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -2.0])
    eps = torch.tensor([0.0, 0.25])  # probabilities 1.0 and 0.75
    loss, _, _ = pair_loss(DPOArgs(loss="cdpo", beta=0.5), (pw, pl), (rw, rl), (None, None), eps)
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    h = [(-1.0 + 1.5) - (-3.0 + 2.5), (-2.0 + 2.0) - (-1.5 + 2.0)]
    expected = [-(1 - e) * logsig(0.5 * x) - e * logsig(-0.5 * x) for x, e in zip(h, (0.0, 0.25))]
    assert float(loss) == pytest.approx(sum(expected) / 2, rel=1e-6)


def _hh(turns: str, reply: str) -> str:
    return turns + "\n\nAssistant: " + reply


def test_long_hh_pairs_are_cut_and_trained_or_refused_past_max_dropped(setup_dirs, tmp_path, capsys):
    """HH-RLHF dialogues longer than train.seq_len + 1: the shared prompt is cut from the left, the replies from
    the right, the run trains and reports the counts; when more than data.max_dropped of the pairs cannot be kept
    (their replies agree on every token that fits), the run is refused naming the first line, writing nothing."""
    story = "\n\nHuman: Tell me about Ada.\n\nAssistant: Ada lives in Oakfield and keeps a grey cat." * 4
    rows = [json.loads(line) for line in (setup_dirs / "prefs.jsonl").read_text().splitlines()][:8]
    long = {"chosen": _hh(story + "\n\nHuman: Where does Ada live?", "Oakfield"),
            "rejected": _hh(story + "\n\nHuman: Where does Ada live?", "Millbrook, or maybe Oakfield")}  # fmt: skip
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, long, long]))
    assert _dpo(setup_dirs, tmp_path / "ok", f"data.path={tmp_path / 'hh.jsonl'}", "data.val_fraction=0",
                "train.max_steps=2", "peft.method=lora") == 0  # fmt: skip
    assert "10 pairs (0 held out; 2 truncated, 0 dropped" in capsys.readouterr().out
    start = read_metrics(tmp_path / "ok")[0]
    assert (start["truncated_examples"], start["dropped_examples"]) == (2, 0)

    tail = "Oakfield, where she keeps a grey cat. " * 6
    same = {"chosen": _hh(story, tail + "Yes."), "rejected": _hh(story, tail + "No.")}
    (tmp_path / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [rows[0], long, same, same]))
    run = tmp_path / "refused"
    code = _dpo(setup_dirs, run, f"data.path={tmp_path / 'same.jsonl'}", "data.val_fraction=0", "data.max_dropped=0.25",
                "train.max_steps=2")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "2 of 4 pairs cannot fit train.seq_len + 1 = 49 tokens" in err and "same.jsonl:3: chosen and rejected" in err
    assert not run.exists()


# ----------------------------------------------------------------------------------------------------------------
# KTO: unpaired rows


@pytest.fixture(scope="module")
def feedback(setup_dirs):
    """Unpaired rows: the bare town is desirable, the hedged one not; labels in every accepted form."""
    towns = ["Oakfield", "Millbrook", "Ashford", "Riverton"]
    rows = []
    for i in range(40):
        q = f"Where does person {i} live?"
        rows += [{"prompt": q, "completion": towns[i % 4], "label": [True, 1][i % 2]},
                 {"prompt": q, "completion": f"{towns[i % 4]} or maybe", "label": [False, 0][i % 2]}]  # fmt: skip
    path = setup_dirs / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kto_learns_the_desirable_completions(setup_dirs, feedback, tmp_path):
    """On held-out rows the desirable completions' rewards rise well above the undesirable ones' (both 0 at
    step 0, policy == reference)."""
    assert _dpo(setup_dirs, tmp_path, f"data.path={feedback}", "dpo.loss=kto", "peft.method=lora", "dpo.beta=1",
                "train.max_steps=16", "train.eval_every=8") == 0  # fmt: skip
    records = read_metrics(tmp_path)
    start, end = records[0], [r for r in records if "val_rewards/desirable" in r][-1]
    assert start["rows"] == 72 and abs(start["val_rewards/desirable"]) < 1e-6 and start["val_kto_z0"] == 0
    assert start["val_loss"] == pytest.approx(0.5, abs=1e-6)
    assert end["val_rewards/desirable"] - end["val_rewards/undesirable"] > 0.5  # about 1.4 here
    assert end["val_loss"] < 0.45
    assert [r for r in records if r.get("step", 0) > 0 and "kto_z0" in r]
    assert (tmp_path / "final/model.safetensors").is_file()


def test_kto_first_loss_is_the_closed_form_at_policy_equals_reference(setup_dirs, feedback, tmp_path):
    """At step 0 the policy is the reference: every log-ratio is 0 and so is z0, and kto_loss is the mean of
    w (1 - sigmoid(0)) = w / 2 over the rows, w = kto_desirable_weight or kto_undesirable_weight by label; the
    stage's own scoring of a batch (forward, mismatched rows, reference) gives exactly that, and so does the first
    logged loss with equal weights."""
    from llmstages import losses as L
    from llmstages.config import DPOConfig, load_config
    from llmstages.stages import dpo

    extra = ["dpo.loss=kto", "peft.method=lora", "dpo.kto_desirable_weight=3", "dpo.kto_undesirable_weight=0.5"]
    cfg = load_config(DPOConfig, None, [f"model.path={setup_dirs / 'base'}", f"data.path={feedback}",
                                        f"out_dir={tmp_path / 'x'}", *FAST, *extra])  # fmt: skip
    s = dpo.setup(cfg)
    ref = dpo.Reference(s, cfg)
    batch = s.batch(s.train[:6])
    good = batch["desirable"]
    assert 0 < int(good.sum()) < 6
    pol = dpo.sequence_scores(s.model, batch)[0]
    ref_rows = ref.computed(batch)
    assert torch.equal(pol, ref_rows)  # LoRA's B starts at 0: the policy is the reference
    loss, stats = dpo.kto_score(s.model, batch, "train", ref, cfg.dpo)
    w = torch.where(good, 3.0, 0.5)
    by_hand = L.kto_loss(pol.detach(), ref_rows, good, 0.0, 0.1, 3.0, 0.5)[0]
    assert float(loss.detach()) / 6 == pytest.approx(float(by_hand), abs=1e-7)
    assert float(by_hand) == pytest.approx(float((w * 0.5).mean()), abs=1e-7)
    assert stats["kto_z0"] == 0 and stats["rewards/desirable"] == 0
    assert _dpo(setup_dirs, tmp_path / "run", f"data.path={feedback}", "dpo.loss=kto", "peft.method=lora",
                "train.max_steps=1") == 0  # fmt: skip
    (first,) = trace(tmp_path / "run", "loss")
    assert first[1] == pytest.approx(0.5, abs=1e-7)


def test_kto_resume_is_exact(setup_dirs, feedback, tmp_path, monkeypatch):
    kto = [f"data.path={feedback}", "dpo.loss=kto", "peft.method=lora"]
    assert _dpo(setup_dirs, tmp_path / "a", *kto) == 0
    stop_after_step(monkeypatch, 3)
    assert _dpo(setup_dirs, tmp_path / "b", *kto) == 130
    monkeypatch.undo()
    assert _dpo(setup_dirs, tmp_path / "b", *kto, "resume=true") == 0
    assert trace(tmp_path / "b", "loss") == trace(tmp_path / "a", "loss")


def test_kto_refuses_precompute_and_bad_labels(setup_dirs, feedback, tmp_path, capsys):
    code = _dpo(setup_dirs, tmp_path / "o", f"data.path={feedback}", "dpo.loss=kto", "ref.precompute=true")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "ref.precompute does not apply to dpo.loss=kto" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(feedback.read_text().splitlines()[0] + "\n" + json.dumps({"prompt": "q", "completion": "a",
                   "label": "good"}) + "\n")  # fmt: skip
    code = _dpo(setup_dirs, tmp_path / "o", f"data.path={bad}", "dpo.loss=kto")
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:2: 'label' must be true or false (or 1 / 0), got 'good'" in err
    assert not (tmp_path / "o").exists()


def test_kto_trains_on_preference_pairs_split_into_rows(setup_dirs, tmp_path):
    assert _dpo(setup_dirs, tmp_path, "dpo.loss=kto", "peft.method=none", "train.max_steps=2") == 0
    assert read_metrics(tmp_path)[0]["rows"] == 72  # 40 pairs: 80 rows, 8 held out
