"""Supervised fine-tuning data: record formats, chat templates, loss masks and packing.

Records (JSONL, or a JSON array):
- Alpaca:  {"instruction", "input" (optional), "output"}
- chat:    {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
- completion: {"prompt", "completion"}
- ShareGPT: {"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]} (axolotl, LLaMA-Factory)

in any format of data/records.py (JSONL, JSON, gzip, Parquet, Arrow, CSV), fields renamed by `data.columns`.

A conversation is rendered to text with the tokenizer's jinja `chat_template` when it has one, else with the
built-in template `<|role|> content<|eos|>` per turn. The character spans of assistant replies (with the EOS
that closes them) are found while rendering; after tokenization exactly the tokens inside those spans are
trained, everything else gets the label IGNORE_INDEX. The EOS is trained even when pad and EOS are one token,
because masking is by position, never by token id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmstages.data.lengths import Tally, kept_lengths
from llmstages.data.records import iter_records
from llmstages.data.text import list_files
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.losses import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
"""ShareGPT's `from` values (and the aliases datasets use) -> our roles."""


# ----------------------------------------------------------------------------------------------------------------
# Records -> conversations


def check_turns(msgs: list[Message], where: str) -> list[Message]:
    """A trainable conversation: an optional system turn first, then user and assistant turns alternating from a
    user turn, ending on an assistant reply, with no empty turn (an empty reply would train the model to say
    nothing; an empty question, or one left unanswered at the end, is a damaged record)."""
    turns = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            at = i + 1 + (len(msgs) - len(turns))
            raise UserError(
                f"{where}: message {at} is a '{m['role']}' turn where a '{expected}' turn belongs "
                "(an optional system turn, then user and assistant in turn)"
            )
    if not any(m["role"] == "assistant" for m in turns):
        raise UserError(f"{where}: conversation has no assistant turn (nothing to train on)")
    for i, m in enumerate(msgs, 1):
        if m["role"] in ("assistant", "user") and not m["content"].strip():
            raise UserError(
                f"{where}: message {i} is an empty {m['role']} {'reply' if m['role'] == 'assistant' else 'turn'}"
            )
    if turns[-1]["role"] != "assistant":
        raise UserError(
            f"{where}: message {len(msgs)} is a user turn after the last reply (nothing trains on it): end the "
            "conversation on an assistant reply"
        )
    return msgs


def chat_messages(value: object, where: str, field: str = "messages") -> list[Message]:
    """A list of turns as messages: {"role", "content"} (our roles) or ShareGPT's {"from", "value"}."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: '{field}' must be a non-empty list of turns")
    out = []
    for i, m in enumerate(value, 1):
        if isinstance(m, dict):  # columnar files give every turn all the fields their column has seen: None
            m = {k: v for k, v in m.items() if v is not None}
        if isinstance(m, dict) and "from" in m and "value" in m:
            role = SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                known = ", ".join(SHAREGPT_ROLES)
                raise UserError(f"{where}: message {i} is from '{m['from']}' (ShareGPT roles: {known})")
            m = {"role": role, "content": m["value"]}
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i} needs a role and 'content' (or ShareGPT 'from' and 'value')")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {i} has unknown role '{m['role']}' (roles: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: message {i} content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def to_messages(record: object, where: str) -> list[Message]:
    """A record in any of the formats as a list of messages; errors name `where` (file:line or file:row)."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a record with named fields, got {type(record).__name__}")
    for key in ("messages", "conversations"):
        if key in record:
            return check_turns(chat_messages(record[key], where, key), where)
    if "instruction" in record:
        if "output" not in record:
            raise UserError(f"{where}: Alpaca record has no 'output'")
        fields = {k: record.get(k, "") for k in ("instruction", "input", "output")}
        if not all(isinstance(v, str) for v in fields.values()):
            raise UserError(f"{where}: 'instruction', 'input' and 'output' must be strings")
        user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
        return check_turns(
            [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}], where
        )
    if "prompt" in record:
        if "completion" not in record:
            raise UserError(f"{where}: prompt/completion record has no 'completion'")
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise UserError(f"{where}: 'prompt' and 'completion' must be strings")
        return check_turns(
            [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}],
            where,
        )
    raise UserError(
        f"{where}: unknown record format (keys: {', '.join(record) or 'none'}); expected 'messages', ShareGPT "
        "'conversations', 'instruction'/'output' or 'prompt'/'completion' (data.columns renames fields)"
    )


def read_conversations(
    paths: Sequence[str | Path], columns: Mapping[str, str] | None = None
) -> list[tuple[str, list[Message]]]:
    """(file:line, messages) for every record of the SFT files, `columns` applied first."""
    out = [(where, to_messages(record, where)) for where, record in iter_records(list_files(paths), columns)]
    if not out:
        raise UserError(f"no SFT records in {', '.join(map(str, paths))}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _builtin_render(messages: Sequence[Message], tok: Tokenizer, add_generation_prompt: bool):
    text, spans = "", []
    eos = tok.eos_token or ""
    for m in messages:
        text += f"<|{m['role']}|>"
        start = len(text)
        text += " " + m["content"] + eos  # the space: words tokenize as in running text (" cat", not "ca" "t")
        if m["role"] == "assistant":
            spans.append((start, len(text)))
    if add_generation_prompt:
        text += "<|assistant|>"
    return text, spans


def _jinja_render(messages: Sequence[Message], tok: Tokenizer, add_generation_prompt: bool) -> str:
    """The tokenizer's jinja template, compiled once and rendered as transformers does (data/tokenizer.py)."""
    return tok.apply_chat_template(messages, add_generation_prompt)


def render(
    messages: Sequence[Message], tok: Tokenizer, add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans of assistant replies). With a jinja template, a reply's span is what rendering
    the conversation up to and including it adds beyond rendering up to it with the generation prompt."""
    if tok.chat_template is None:
        return _builtin_render(messages, tok, add_generation_prompt)
    text = _jinja_render(messages, tok, add_generation_prompt)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _jinja_render(messages[:i], tok, True)
        upto = _jinja_render(messages[: i + 1], tok, False)
        if not text.startswith(before) or not text.startswith(upto):
            raise UserError("chat template: rendering is not prefix-stable; cannot locate assistant replies")
        spans.append((len(before), len(upto)))
    return text, spans


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; IGNORE_INDEX where not trained. Label t is the token at t (unshifted)."""
    where: str = ""


def tokenize_conversation(
    messages: Sequence[Message], tok: Tokenizer, train_on_prompt: bool = False, where: str = ""
) -> Example:
    text, spans = render(messages, tok)
    enc = tok.tk.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    labels = []
    for tid, (a, b) in zip(ids, enc.offsets):
        inside = any(s <= a and b <= e and b > a for s, e in spans)
        labels.append(tid if (inside or train_on_prompt) else IGNORE_INDEX)
    return Example(ids, labels, where)


def prompt_ids(messages: Sequence[Message], tok: Tokenizer) -> list[int]:
    """Token ids of a conversation up to the assistant's turn (what generation starts from)."""
    text, _ = render(messages, tok, add_generation_prompt=True)
    return tok.tk.encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------------------------------------------
# Batches: padded or packed


def fit_example(ex: Example, limit: int) -> Example | None:
    """`ex` within `limit` tokens by the policy of data/lengths.py: its prompt (the tokens before the first trained
    one) cut from the left, the rest from the right; None when no trained target would be left."""
    first = next((i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX), len(ex.labels))
    p, r = kept_lengths(first, len(ex.input_ids) - first, limit)
    out = Example(ex.input_ids[first - p : first + r], ex.labels[first - p : first + r], ex.where)
    if all(label == IGNORE_INDEX for label in out.labels[1:]):  # label 0 is never a target
        return None
    return out


def fit_length(
    examples: list[Example], seq_len: int, truncate: bool, max_dropped: float = 1.0
) -> tuple[list[Example], Tally]:
    """Examples within `seq_len + 1` tokens (seq_len positions of shifted targets): cut by `fit_example`, or
    refused when `truncate` is false; (the examples kept, the counts). Refused when nothing is left or more than
    `max_dropped` of them would be dropped."""
    limit = seq_len + 1
    out, tally = [], Tally("example", f"train.seq_len + 1 = {limit}")
    for ex in examples:
        long = len(ex.input_ids) > limit
        if long and not truncate:
            raise UserError(
                f"{ex.where}: example of {len(ex.input_ids)} tokens is longer than train.seq_len + 1 = "
                f"{limit}; raise train.seq_len or set data.truncate=true"
            )
        fitted = fit_example(ex, limit)
        if fitted is None and not truncate:
            raise UserError(f"{ex.where}: no trained token left")
        tally.count(long, ex.where, None if fitted else f"example of {len(ex.input_ids)} tokens keeps no trained token")
        if fitted is not None:
            out.append(fitted)
    tally.check(max_dropped)
    return out, tally


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (len(rows), longest row): every row left-aligned with `pad_id` after it; the key mask is
    1 on the row's tokens (a model reading the last real token finds it at mask.sum(-1) - 1)."""
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, row in enumerate(rows):
        ids[k, : len(row)] = torch.tensor(row)
        mask[k, : len(row)] = 1
    return ids, mask


def padded_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows: input_ids, targets (next-token labels, IGNORE_INDEX on padding) and the key mask."""
    T = max(len(e.input_ids) for e in examples) - 1
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids) - 1
        ids[i, :n] = torch.tensor(e.input_ids[:-1])
        targets[i, :n] = torch.tensor(e.labels[1:])
        mask[i, :n] = 1
    return {"input_ids": ids, "targets": targets, "mask": mask}


def packed_batch(examples: Sequence[Example], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Examples placed one after another in rows of `seq_len` (first fit, in order), with per-document position
    ids and a block-diagonal causal mask: no attention and no loss crosses an example boundary."""
    rows: list[list[Example]] = []
    used: list[int] = []
    for e in examples:
        n = len(e.input_ids) - 1
        for r, u in enumerate(used):
            if u + n <= seq_len:
                rows[r].append(e)
                used[r] += n
                break
        else:
            rows.append([e])
            used.append(n)
    B = len(rows)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((B, seq_len), dtype=torch.long)
    doc = torch.full((B, seq_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, e in enumerate(row):
            n = len(e.input_ids) - 1
            ids[r, at : at + n] = torch.tensor(e.input_ids[:-1])
            targets[r, at : at + n] = torch.tensor(e.labels[1:])
            pos[r, at : at + n] = torch.arange(n)
            doc[r, at : at + n] = d
            at += n
    causal = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    eye = torch.eye(seq_len, dtype=torch.bool)  # padding positions see themselves only (their output is unused)
    mask = (causal & same) | eye
    return {"input_ids": ids, "targets": targets, "position_ids": pos, "mask": mask[:, None]}
