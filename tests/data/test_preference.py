"""Preference records in every accepted shape become (prompt conversation, chosen reply, rejected reply)."""

from __future__ import annotations

import json

import pytest

from llmstages.data.preference import pair_batch, read_preferences, read_prompts, to_pair, tokenize_pair
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
