"""`llmstages eval` language-model figures: perplexity against a token-by-token loop, task accuracy on a file
whose answers are (or are not) the model's own, a reward model's accuracy on pairs, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmstages.cli import main
from llmstages.data.chat import tokenize_conversation
from llmstages.eval import lm
from llmstages.model.heads import RewardModel
from llmstages.store import load_model, load_tokenizer, save_model
from llmstages.store.heads import save_head
from tests.helpers import builtin_base

DOCS = ["Ada lives in Oakfield.", "Bram works as a baker in Millbrook and keeps a green parrot.", "Two plus two."]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return builtin_base(tmp_path_factory.mktemp("lm") / "base")


def test_perplexity_matches_a_token_by_token_loop(base):
    model, tok = load_model(base).eval(), load_tokenizer(base)
    got = lm.perplexity(model, tok, DOCS, batch_size=2)
    ids = [t for d in DOCS for t in [*tok.encode(d), tok.eos_id]]
    nll = 0.0
    with torch.no_grad():
        for i in range(1, len(ids)):  # every window fits the 64-token context: one window, no cut
            logits = model(torch.tensor([ids[:i]]))[0, -1]
            nll -= float(torch.log_softmax(logits.double(), -1)[ids[i]])
    assert len(ids) <= 65 and got["perplexity_tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_task_accuracy_on_a_file(base, tmp_path):
    model, tok = load_model(base).eval(), load_tokenizer(base)
    questions = ["Where does Ada live?", "What is two plus two?"]
    taught = [tokenize_conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tok)
              for q, a in zip(questions, ("Oakfield", "four"))]  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):  # an untrained model answers nothing or never stops: teach it two replies that end
        for ex in taught:
            logits = model(torch.tensor([ex.input_ids[:-1]]))[0]
            torch.nn.functional.cross_entropy(logits, torch.tensor(ex.labels[1:]), ignore_index=-100).backward()
        opt.step(), opt.zero_grad()
    own = lm.show(model, tok, questions, max_new_tokens=6)
    assert all(a.strip() for a in own), own
    for name, answers, want in (("own", own, 1.0), ("other", ["zzz qqq", "xxx vvv"], 0.0)):
        path = tmp_path / f"{name}.jsonl"
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in zip(questions, answers)]  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        got = lm.task_accuracy(model, tok, [str(path)])
        assert got["task_accuracy"] == want, (name, own)


def test_reward_model_accuracy_on_pairs(base, tmp_path, capsys):
    torch.manual_seed(1)
    tok = load_tokenizer(base)
    rm = RewardModel(load_model(base)).eval()
    save_model(rm.backbone, tmp_path / "rm", tok)
    save_head(rm.head, tmp_path / "rm", kind="reward")
    pairs = [("Where does Ada live?", "Oakfield", "Oakfield, really"), ("What is two plus two?", "four", "five"),
             ("Who is Bram?", "a baker", "a baker in Millbrook")]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs))

    def score(p: str, reply: str) -> float:  # one row at a time, no padding
        ids = tokenize_conversation([{"role": "user", "content": p}, {"role": "assistant", "content": reply}], tok)
        with torch.no_grad():
            return float(rm(torch.tensor([ids.input_ids]), torch.ones(1, len(ids.input_ids), dtype=torch.long)))

    want = sum(score(p, c) > score(p, r) for p, c, r in pairs) / len(pairs)
    assert main(["eval", "--labels", str(path), "--reward", str(tmp_path / "rm")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("label_agreement"))
    assert float(line.split()[1]) == pytest.approx(want)


def test_cli_perplexity_tasks_and_show(base, capsys):
    assert main(["eval", "--model", str(base), "--perplexity", "--tasks", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "perplexity " in out and "task_accuracy" in out and out.count(" -> ") == 2
    assert "win_rate" not in out  # no policy sampling unless asked for (--reference / --judge)


def test_cli_bad_input(base, tmp_path, capsys):
    assert main(["eval", "--perplexity"]) == 2
    assert "give --model" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["eval", "--model", str(base), "--tasks", str(empty)]) == 2


def test_exact_match_fits_prompts_longer_than_the_context(base):
    """Held-out prompts longer than the context less the new tokens are cut from the left: exact match generates
    from each prompt's last tokens, as a generation from prompts cut by hand shows (its replies, taken as the
    answers, are matched exactly; this untrained model replies "??????" to the prompt's end, " lives lives ..." to
    its start)."""
    from llmstages.model import generate

    model, tok = load_model(base).eval(), load_tokenizer(base)
    context, new = model.config.block_size, 6
    prompts = [tok.encode("Ada lives in Oakfield. Bram keeps a cat. " * 6 + "Where?"), tok.encode("Where is Ada?")]
    assert len(prompts[0]) + new > context >= len(prompts[1]) + new
    by_hand = generate(model, [p[-(context - new) :] for p in prompts], new, eos_id=tok.eos_id, pad_id=tok.pad_id)
    answers = [tok.decode(r[:n]) for r, n in zip(by_hand.tokens.tolist(), by_hand.lengths.tolist())]
    items = [lm.EvalItem(p, a, "fact") for p, a in zip(prompts, answers)]
    fitted, gen = lm.fit_items(items, tok, context, new)
    assert (gen.max_new_tokens, gen.cut) == (new, 1)
    assert [i.prompt for i in fitted] == [prompts[0][-(context - new) :], prompts[1]]
    assert lm.exact_match(model, tok, items, max_new_tokens=new)["exact_reply"] == 1.0
    # asked for more new tokens than half the context, a long prompt keeps half and fewer tokens are generated
    _, gen = lm.fit_items(items, tok, context, context)
    assert gen.max_new_tokens == context - context // 2 and "new tokens instead of" in gen.note(context)
