"""SFT data: record formats, exactly-the-assistant loss masks (EOS included), packing that changes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from llmstages.data.chat import (
    Example,
    fit_length,
    packed_batch,
    padded_batch,
    read_conversations,
    to_messages,
    tokenize_conversation,
)
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.losses import IGNORE_INDEX
from llmstages.model import GPT, preset
from tests.helpers import tiny_tokenizer

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Where does Ada live?"},
    {"role": "assistant", "content": "Oakfield"},
    {"role": "user", "content": "And her pet?"},
    {"role": "assistant", "content": "a grey cat"},
]


def _trained(ex: Example) -> list[int]:
    return [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]


def test_formats_become_the_same_messages():
    expected = [{"role": "user", "content": "Hi\n\nthere"}, {"role": "assistant", "content": "yes"}]
    assert to_messages({"instruction": "Hi", "input": "there", "output": "yes"}, "f:1") == expected
    assert to_messages({"prompt": "Hi\n\nthere", "completion": "yes"}, "f:1") == expected
    assert to_messages({"messages": expected}, "f:1") == expected


def test_only_assistant_tokens_and_their_eos_are_trained():
    tok = tiny_tokenizer()
    ex = tokenize_conversation(CHAT, tok)
    # Independent reference: the reply tokens as running text, each followed by EOS.
    expected = tok.encode(" Oakfield") + [tok.eos_id] + tok.encode(" a grey cat") + [tok.eos_id]
    assert _trained(ex) == expected
    assert ex.input_ids.count(tok.eos_id) == 5  # every turn ends with EOS; only the assistants' two are trained


def test_eos_is_trained_when_pad_is_eos():
    base = tiny_tokenizer()
    tok = Tokenizer(base.tk, bos_token=base.bos_token, eos_token=base.eos_token, pad_token=base.eos_token)
    assert tok.pad_id == tok.eos_id
    ex = tokenize_conversation(CHAT[:3], tok)
    batch = padded_batch([ex, tokenize_conversation(CHAT, tok)], tok.pad_id)
    row = batch["targets"][0]
    n = int(batch["mask"][0].sum())
    assert int(row[n - 1]) == tok.eos_id  # the reply's EOS is a target ...
    assert (row[n:] == IGNORE_INDEX).all()  # ... the padding after it (same id) is not


def test_jinja_template_masks():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    ex = tokenize_conversation(CHAT, tok)
    assert _trained(ex) == tok.encode("Oakfield") + [tok.eos_id] + tok.encode("a grey cat") + [tok.eos_id]


def test_packing_gives_the_same_per_example_loss():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = GPT(preset("llama_tiny", vocab_size=tok.vocab_size, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                       block_size=128)).eval()  # fmt: skip
    convs = [CHAT, CHAT[:3], [{"role": "user", "content": "Copy: red"}, {"role": "assistant", "content": "red"}]]
    examples = [tokenize_conversation(c, tok) for c in convs]

    def summed_losses(batch):
        with torch.no_grad():
            logits = model(batch["input_ids"], mask=batch["mask"], position_ids=batch.get("position_ids"))
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                     batch["targets"].reshape(-1), reduction="sum")  # fmt: skip

    separate = sum(float(summed_losses(padded_batch([e], tok.pad_id))) for e in examples)
    packed = packed_batch(examples, 128, tok.pad_id)
    assert packed["input_ids"].shape[0] == 1  # all three share one row
    assert abs(float(summed_losses(packed)) - separate) < 1e-3


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"instruction": "Say hi"}, "f.jsonl:1: Alpaca record has no 'output'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "f.jsonl:1: message 1 has unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "f.jsonl:1: conversation has no assistant turn"),
        ({"text": "plain"}, "f.jsonl:1: unknown record format"),
    ],
)
def test_bad_records(tmp_path, record, message):
    (tmp_path / "f.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError) as e:
        read_conversations([tmp_path / "f.jsonl"])
    assert message in str(e.value)


def test_too_long_examples_truncated_or_refused():
    tok = tiny_tokenizer()
    ex = tokenize_conversation(CHAT, tok, where="data.jsonl:7")
    first = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
    seq_len = first + 2  # keeps the first reply's start, cuts the rest
    kept, cut = fit_length([ex], seq_len, truncate=True)
    assert cut == 1 and len(kept[0].input_ids) == seq_len + 1 and kept[0].labels == ex.labels[: seq_len + 1]
    assert fit_length([ex], first - 1, truncate=True)[0] == []  # nothing trained left: dropped
    with pytest.raises(UserError, match=r"data.jsonl:7: example of \d+ tokens is longer than train.seq_len"):
        fit_length([ex], seq_len, truncate=False)


def test_right_pad_rows_read_like_unpadded_ones():
    from llmstages.data.chat import right_pad

    rows = [[5, 6, 7, 8], [9, 10], [11]]
    ids, mask = right_pad(rows, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0], [11, 0, 0, 0]]
    assert mask.sum(-1).tolist() == [4, 2, 1]
    torch.manual_seed(0)
    model = GPT(preset("llama_tiny", vocab_size=64, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1)).eval()
    with torch.no_grad():
        padded = model(ids, mask=mask)
        for k, row in enumerate(rows):  # the last real token of each padded row sees what the row alone sees
            alone = model(torch.tensor([row]))[0, -1]
            assert torch.allclose(padded[k, len(row) - 1], alone, atol=1e-5)
