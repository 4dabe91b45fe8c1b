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
