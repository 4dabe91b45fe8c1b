"""SFT data: record formats, exactly-the-assistant loss masks (EOS included), packing that changes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from llmstages.data.chat import (
    Example,
    fit_example,
    fit_length,
    packed_batch,
    padded_batch,
    read_conversations,
    to_messages,
    tokenize_conversation,
)
from llmstages.data.lengths import fit_generation, fit_prompts, kept_lengths
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


def _expected_kept(P: int, R: int, L: int) -> tuple[int, int]:
    """The policy of data/lengths.py case by case, written independently of its min/max formula."""
    if P + R <= L:
        return P, R  # fits: unchanged
    if P <= L // 2:
        return P, L - P  # a short prompt stays whole, the reply is cut
    if R <= L - L // 2:
        return L - R, R  # a short reply stays whole, the prompt is cut
    return L // 2, L - L // 2  # both long: the prompt keeps half


def test_long_examples_keep_the_prompts_end_and_the_replys_start():
    """Every (prompt, reply, window) up to 12 tokens: the kept tokens are the prompt's last p and the reply's first
    r, with (p, r) from the case-by-case policy; the labels travel with their tokens."""
    for P in range(1, 13):
        for R in range(1, 13):
            for L in range(2, 13):
                ex = Example(list(range(P + R)), [IGNORE_INDEX] * P + list(range(P, P + R)), "f.jsonl:1")
                p, r = _expected_kept(P, R, L)
                got = fit_example(ex, L)
                assert got.input_ids == list(range(P - p, P + r)), (P, R, L)
                assert got.labels == [IGNORE_INDEX] * p + list(range(P, P + r))
                assert kept_lengths(P, R, L) == (p, r)
    # the worked cases of the README's window of 65: a long prompt loses its start, a long reply its end
    ex = Example(list(range(110)), [IGNORE_INDEX] * 100 + list(range(100, 110)))
    assert fit_example(ex, 65).input_ids == list(range(45, 110))
    ex = Example(list(range(110)), [IGNORE_INDEX] * 10 + list(range(10, 110)))
    assert fit_example(ex, 65).input_ids == list(range(0, 65))


def test_long_conversations_are_cut_counted_or_refused():
    tok = tiny_tokenizer()
    long_prompt = [
        {"role": "user", "content": "Ada lives in Oakfield. " * 20 + "Where?"},
        {"role": "assistant", "content": "Oak"},
    ]
    ex = tokenize_conversation(long_prompt, tok, where="data.jsonl:7")
    short = tokenize_conversation(CHAT[1:3], tok, where="data.jsonl:8")
    kept, tally = fit_length([ex, short], 30, truncate=True)
    assert (tally.total, tally.truncated, tally.dropped) == (2, 1, 0)
    assert kept[1].input_ids == short.input_ids  # what fits is untouched
    cut = kept[0]
    assert len(cut.input_ids) == 31 and _trained(cut) == _trained(ex)  # the whole reply, its EOS included
    reply_at = cut.labels.index(next(t for t in cut.labels if t != IGNORE_INDEX))
    assert tok.decode(cut.input_ids[:reply_at], False).endswith(
        "Oakfield. Where?<|eos|><|assistant|>"
    )  # the prompt's end is kept
    assert tally.metrics() == {"truncated_examples": 1, "dropped_examples": 0}
    with pytest.raises(UserError, match=r"data.jsonl:7: example of \d+ tokens is longer than train.seq_len"):
        fit_length([ex, short], 30, truncate=False)


def test_too_many_dropped_examples_refuse_the_data_naming_the_first():
    untrained = [Example([1, 2, 3], [IGNORE_INDEX] * 3, f"d.jsonl:{i}") for i in (12, 3)]  # first in the file: 3
    fine = [Example([1, 2, 3], [IGNORE_INDEX, 2, 3], f"d.jsonl:{i}") for i in (1, 2, 4)]
    kept, tally = fit_length(fine + untrained, 8, truncate=True, max_dropped=0.5)  # 2 of 5 dropped: allowed
    assert len(kept) == 3 and tally.dropped == 2
    assert tally.first_dropped == "d.jsonl:3: example of 3 tokens keeps no trained token"
    with pytest.raises(UserError, match=r"2 of 5 examples .* data.max_dropped=0.3.*the first: d.jsonl:3: "):
        fit_length(fine + untrained, 8, truncate=True, max_dropped=0.3)
    with pytest.raises(
        UserError, match="none of the 2 examples fits train.seq_len"
    ):  # nothing left: refused whatever max_dropped says
        fit_length(untrained, 8, truncate=True, max_dropped=1.0)


def test_generation_fits_the_context():
    """Prompts cut from the left for the new tokens; fewer new tokens only when a prompt would keep less than half."""
    prompts = [list(range(100)), list(range(10))]
    gen = fit_generation(prompts, 20, 64)
    assert gen.prompts == [list(range(56, 100)), list(range(10))] and gen.max_new_tokens == 20 and gen.cut == 1
    gen = fit_generation(prompts, 50, 64)
    assert gen.prompts[0] == list(range(68, 100)) and gen.max_new_tokens == 32
    assert "1 of 2 evaluation prompts cut from the left to 32 tokens, 32 new tokens instead of 50" in gen.note(64)
    assert fit_generation(prompts, 20, 200).note(200) is None
    assert fit_prompts(prompts, 50, 64, "grpo.max_new_tokens") == ([list(range(86, 100)), list(range(10))], 1)
    with pytest.raises(UserError, match="grpo.max_new_tokens=64 leaves no room for a prompt"):
        fit_prompts(prompts, 64, 64, "grpo.max_new_tokens")


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
