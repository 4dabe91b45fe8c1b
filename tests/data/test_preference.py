"""Preference records in every accepted shape become (prompt conversation, chosen reply, rejected reply)."""

from __future__ import annotations

import json

import pytest

from llmstages.data.chat import prompt_ids
from llmstages.data.preference import (
    PreferencePair,
    pair_batch,
    read_preferences,
    read_prompts,
    to_pair,
    tokenize_pair,
    tokenize_pairs,
)
from llmstages.errors import UserError
from tests.helpers import tiny_tokenizer


def test_string_and_message_forms():
    p = to_pair({"prompt": "Where does Ada live?", "chosen": "Oakfield", "rejected": "Oakfield or Ashford"}, "f:1")
    assert p.prompt == ({"role": "user", "content": "Where does Ada live?"},)
    assert (p.chosen, p.rejected) == ("Oakfield", "Oakfield or Ashford")
    conv = [{"role": "user", "content": "Hi"}]
    full = {"prompt": conv, "chosen": [*conv, {"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "Go away"}]}  # fmt: skip
    q = to_pair(full, "f:2")
    assert q.prompt == tuple(conv) and (q.chosen, q.rejected) == ("Hello", "Go away")


def test_hh_rlhf_dialogues_split_at_the_last_shared_assistant_turn():
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Where does Ada live?\n\nAssistant:"
    p = to_pair({"chosen": shared + " In Oakfield.", "rejected": shared + " In Oakfield or Ashford."}, "f:1")
    assert [m["role"] for m in p.prompt] == ["user", "assistant", "user"]
    assert p.prompt[2]["content"] == "Where does Ada live?"
    assert (p.chosen, p.rejected) == ("In Oakfield.", "In Oakfield or Ashford.")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "f.jsonl:1: chosen and rejected are identical"),
        ({"prompt": "q", "chosen": "a"}, "f.jsonl:1: preference record has no 'rejected'"),
        ({"chosen": "one text", "rejected": "another"}, "share no '\\n\\nAssistant:' turn"),
        (
            {"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"},
            "message 1 has unknown role 'bot'",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "probability": 0.3}, "f.jsonl:1: 'probability' must be"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "probability": "high"}, "f.jsonl:1: 'probability' must"),
    ],
)
def test_bad_pairs(tmp_path, record, message):
    (tmp_path / "f.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError) as e:
        read_preferences([tmp_path / "f.jsonl"])
    assert message in str(e.value)


def test_prompt_sets(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Where does Ada live?"}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello"}]}) + "\n")  # fmt: skip
    prompts = read_prompts([f])
    assert [m for _, m in prompts] == [[{"role": "user", "content": "Where does Ada live?"}],
                                       [{"role": "user", "content": "Hi"}]]  # fmt: skip
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        read_prompts([empty])
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(UserError, match="blank.jsonl:1: empty prompt"):
        read_prompts([blank])


def test_soft_labels_travel_to_the_batch(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "probability": 0.75}, {"prompt": "q", "chosen": "a",
            "rejected": "c"}]  # fmt: skip
    (tmp_path / "f.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = read_preferences([tmp_path / "f.jsonl"])
    assert [p.probability for p in pairs] == [0.75, None]
    tok = tiny_tokenizer()
    batch = pair_batch([tokenize_pair(p, tok, i, 64) for i, p in enumerate(pairs)], tok.pad_id)
    assert batch["probability"][0] == 0.75 and batch["probability"][1].isnan()


def test_long_pairs_share_the_cut_prompt_and_keep_their_replies_starts():
    """A pair too long for the window: the prompt is cut from the left by the same count on both sides (they stay a
    pair, both ending with the prompt's last tokens), each reply from the right; pairs that fit are untouched."""
    tok = tiny_tokenizer()
    long = PreferencePair(({"role": "user", "content": "Ada lives in Oakfield. " * 12 + "Where?"},),
                          "Oakfield", "Millbrook, I think, or maybe Oakfield", "p.jsonl:1")  # fmt: skip
    short = PreferencePair(({"role": "user", "content": "Where?"},), "Oakfield", "Millbrook", "p.jsonl:2")
    n_prompt = len(prompt_ids(list(long.prompt), tok))
    full = tokenize_pair(long, tok, 0, 1000)
    longest = max(len(full.chosen.input_ids), len(full.rejected.input_ids))
    limit = 30
    assert n_prompt > limit // 2 and longest - n_prompt > limit - limit // 2  # both long: the prompt keeps half
    pairs, tally = tokenize_pairs([long, short], tok, limit, "train.seq_len + 1 = 30")
    assert (tally.truncated, tally.dropped) == (1, 0) and [p.index for p in pairs] == [0, 1]
    p, r = limit // 2, limit - limit // 2
    for got, whole in ((pairs[0].chosen, full.chosen), (pairs[0].rejected, full.rejected)):
        assert got.input_ids == whole.input_ids[n_prompt - p : n_prompt + r]
        assert got.labels == whole.labels[n_prompt - p : n_prompt + r]
    assert pairs[1].chosen.input_ids == tokenize_pair(short, tok, 1, 1000).chosen.input_ids


def test_pairs_whose_replies_become_the_same_are_dropped_and_counted(tmp_path):
    same_start = {"prompt": "Where does Ada live?", "chosen": "Oakfield, the town by the river, yes",
                  "rejected": "Oakfield, the town by the river, no"}  # fmt: skip
    rows = [{"prompt": "Where?", "chosen": "Oakfield", "rejected": "Ashford"}, same_start, same_start]
    (tmp_path / "f.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tiny_tokenizer()
    pairs = read_preferences([tmp_path / "f.jsonl"])
    kept, tally = tokenize_pairs(pairs, tok, 24, "train.seq_len + 1 = 24", max_dropped=1.0)
    assert len(kept) == 1 and (tally.truncated, tally.dropped) == (0, 2)
    assert "f.jsonl:2: chosen and rejected are the same in the 12 reply tokens that fit" in tally.first_dropped
    with pytest.raises(
        UserError, match=r"2 of 3 pairs cannot fit train.seq_len \+ 1 = 24 tokens.*the first: .*f.jsonl:2: "
    ):
        tokenize_pairs(pairs, tok, 24, "train.seq_len + 1 = 24", max_dropped=0.5)
    with pytest.raises(UserError, match="f.jsonl:2: chosen and rejected are the same"):
        tokenize_pair(pairs[1], tok, 0, 23)


def test_unpaired_feedback_rows_with_every_label_form_and_pairs_split_into_rows(tmp_path):
    """KTO's rows: labels true/false, 1/0 (and their text, as CSV cells give), message-list prompts; a pair record
    gives two rows, chosen desirable and rejected not; a bad label is refused naming its line."""
    from llmstages.data.preference import read_feedback

    conv = [{"role": "user", "content": "Hi"}]
    rows = [
        {"prompt": "Where does Ada live?", "completion": "Oakfield", "label": True},
        {"prompt": "Where does Ada live?", "completion": "Ashford", "label": False},
        {"prompt": conv, "completion": [*conv, {"role": "assistant", "content": "Hello"}], "label": 1},
        {"prompt": "q", "completion": "no", "label": 0},
        {"prompt": "Where does Bo live?", "chosen": "Millbrook", "rejected": "Millbrook or maybe"},
    ]
    f = tmp_path / "fb.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_feedback([f])
    assert [(r.completion, r.desirable) for r in got] == [
        ("Oakfield", True), ("Ashford", False), ("Hello", True), ("no", False),
        ("Millbrook", True), ("Millbrook or maybe", False),
    ]  # fmt: skip
    assert got[2].prompt == tuple(conv) and got[5].where.endswith("fb.jsonl:5")
    csv = tmp_path / "fb.csv"
    csv.write_text("question,answer,label\nq1,yes,true\nq2,no,0\n")
    got = read_feedback([csv], {"prompt": "question", "completion": "answer"})
    assert [(r.completion, r.desirable) for r in got] == [("yes", True), ("no", False)]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[0], "label": 2}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: 'label' must be true or false \(or 1 / 0\), got 2"):
        read_feedback([bad])
    bad.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl:1: feedback record has no 'label'"):
        read_feedback([bad])


def test_feedback_batches_pair_each_prompt_with_the_previous_rows_completion():
    """The kl_* rows of a KTO batch: row i's prompt with row i - 1's completion (the first takes the last's), cut
    to the window by the long-example policy; prompts cut from the left, completions from the right."""
    from llmstages.data.preference import Feedback, feedback_batch, tokenize_feedback

    tok = tiny_tokenizer()
    rows = [Feedback(({"role": "user", "content": q},), a, good, f"f:{i}")
            for i, (q, a, good) in enumerate([("Where does Ada live?", "Oakfield", True), ("Hi", "Hello there", False),
                                              ("Who?", "Bo", True)])]  # fmt: skip
    tokenized, tally = tokenize_feedback(rows, tok, 64, "64")
    assert [r.index for r in tokenized] == [0, 1, 2] and tally.dropped == 0
    b = feedback_batch(tokenized, tok.pad_id, 64)
    assert b["desirable"].tolist() == [True, False, True]
    for i in range(3):
        ex, prev = tokenized[i].example, tokenized[i - 1].example
        prompt_len = len(prompt_ids(list(rows[i].prompt), tok))
        m = len(prompt_ids(list(rows[i - 1].prompt), tok))
        want = ex.input_ids[:prompt_len] + prev.input_ids[m:]
        assert b["kl_input_ids"][i, : len(want) - 1].tolist() == want[:-1]
        targets = b["kl_targets"][i]
        assert targets[targets != -100].tolist() == prev.input_ids[m:]  # only the completion is scored
    short, _ = tokenize_feedback(rows, tok, 8, "8")
    assert all(len(r.example.input_ids) <= 8 for r in short)
    assert all(len(r) <= 7 for r in feedback_batch(short, tok.pad_id, 8)["kl_input_ids"])
