"""Preference data for reward models and DPO, and prompt sets for PPO/GRPO.

Records (JSONL, or a JSON array):
- {"prompt", "chosen", "rejected"}: strings, or message lists (the prompt a conversation, chosen/rejected the
  assistant replies, or whole conversations that share the prompt);
- HH-RLHF style {"chosen", "rejected"}: two whole dialogues ("\\n\\nHuman: ... \\n\\nAssistant: ...") that share a
  prefix; the prompt is split off at the last "Assistant:" turn they have in common;
- prompts only, {"prompt"}: string or message list;
- unpaired feedback (KTO), {"prompt", "completion", "label"}: the label true / false (or 1 / 0); preference pairs
  are read as two such rows (chosen: true, rejected: false).
Every record becomes a conversation (a list of messages) for the prompt and a reply string per side.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmstages.data.chat import (
    Example,
    Message,
    chat_messages,
    fit_example,
    padded_batch,
    prompt_ids,
    right_pad,
    to_messages,
    tokenize_conversation,
)
from llmstages.data.lengths import Tally, kept_lengths
from llmstages.data.records import iter_records
from llmstages.data.text import list_files
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.losses import IGNORE_INDEX

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    where: str = ""
    probability: float | None = None
    """How sure the labeller was that `chosen` is better (in (0.5, 1]); None: as sure as the config says."""


def _messages(value: object, where: str, field: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return chat_messages(value, where, field)
    raise UserError(f"{where}: '{field}' must be a string or a list of messages")


def _reply(value: object, prompt: list[Message], where: str, field: str) -> str:
    """The assistant reply of one side: a string, or a conversation that extends the prompt by one reply."""
    if isinstance(value, str):
        return value
    msgs = _messages(value, where, field)
    if msgs[: len(prompt)] == prompt:
        msgs = msgs[len(prompt) :]
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise UserError(f"{where}: '{field}' must be one assistant reply after the prompt")
    return msgs[0]["content"]


def _hh_dialogue(text: str) -> list[Message]:
    """ "\\n\\nHuman: a\\n\\nAssistant: b..." -> messages (a trailing empty assistant turn is dropped)."""
    out: list[Message] = []
    rest = text
    while rest:
        h, a = rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)
        starts = [(i, role) for i, role in ((h, "user"), (a, "assistant")) if i >= 0]
        if not starts:
            break
        i, role = min(starts)
        marker = HH_HUMAN if role == "user" else HH_ASSISTANT
        rest = rest[i + len(marker) :]
        nxt = [j for j in (rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)) if j >= 0]
        end = min(nxt) if nxt else len(rest)
        out.append({"role": role, "content": rest[:end].strip()})
        rest = rest[end:]
    return out


def split_conversations(chosen: list[Message], rejected: list[Message], where: str):
    """Two whole conversations sharing a prompt (UltraFeedback's `chosen` / `rejected` message lists): split at
    their last shared turn -> (prompt, chosen reply, rejected reply)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    prompt, rest_w, rest_l = chosen[:n], chosen[n:], rejected[n:]
    for side, rest in (("chosen", rest_w), ("rejected", rest_l)):
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            raise UserError(
                f"{where}: after the {n} shared turns, '{side}' must hold one assistant reply (it holds {len(rest)} "
                "turns); the conversations must share the prompt"
            )
    if not prompt or prompt[-1]["role"] != "user":
        raise UserError(f"{where}: chosen and rejected share no prompt ending in a user turn")
    return prompt, rest_w[0]["content"], rest_l[0]["content"]


def split_hh(chosen: str, rejected: str, where: str) -> tuple[list[Message], str, str]:
    """Split two HH-RLHF dialogues at their last shared "Assistant:" turn: (prompt, chosen reply, rejected)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)  # the last Assistant marker inside the shared prefix
    if cut < 0:
        raise UserError(f"{where}: chosen and rejected share no '\\n\\nAssistant:' turn to split the prompt at")
    head = cut + len(HH_ASSISTANT)
    prompt = _hh_dialogue(chosen[:cut])
    if not prompt:
        raise UserError(f"{where}: no Human turn before the shared Assistant turn")
    return prompt, chosen[head:].strip(), rejected[head:].strip()


def to_pair(record: object, where: str) -> PreferencePair:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise UserError(f"{where}: preference record has no '{key}'")
    if "prompt" in record:
        prompt = _messages(record["prompt"], where, "prompt")
        chosen = _reply(record["chosen"], prompt, where, "chosen")
        rejected = _reply(record["rejected"], prompt, where, "rejected")
    elif isinstance(record["chosen"], str) and isinstance(record["rejected"], str):
        prompt, chosen, rejected = split_hh(record["chosen"], record["rejected"], where)
    elif isinstance(record["chosen"], list) and isinstance(record["rejected"], list):
        w = chat_messages(record["chosen"], where, "chosen")
        prompt, chosen, rejected = split_conversations(w, chat_messages(record["rejected"], where, "rejected"), where)
    else:
        raise UserError(
            f"{where}: without 'prompt', chosen and rejected must be HH-RLHF dialogue strings or whole conversations"
        )
    if chosen == rejected:
        raise UserError(f"{where}: chosen and rejected are identical (the pair carries no preference)")
    if not chosen.strip() or not rejected.strip():
        raise UserError(f"{where}: empty chosen or rejected reply")
    prob = record.get("probability")
    if prob is not None and (isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.5 <= prob <= 1):
        raise UserError(f"{where}: 'probability' must be a number from 0.5 to 1 (that chosen is better), got {prob!r}")
    return PreferencePair(tuple(prompt), chosen, rejected, where, None if prob is None else float(prob))


def read_preferences(paths: Sequence[str | Path], columns: Mapping[str, str] | None = None) -> list[PreferencePair]:
    """The preference pairs of the files, `columns` applied first."""
    pairs = [to_pair(record, where) for where, record in iter_records(list_files(paths), columns)]
    if not pairs:
        raise UserError(f"no preference records in {', '.join(map(str, paths))}")
    return pairs


def read_prompts(
    paths: Sequence[str | Path], columns: Mapping[str, str] | None = None
) -> list[tuple[str, list[Message]]]:
    """(file:line, prompt conversation) for PPO/GRPO prompt files; chat, ShareGPT or Alpaca records give their
    prompt (the turns before the last assistant reply)."""
    return [(where, msgs) for where, msgs, _ in read_prompt_rows(paths, columns)]


PROMPT_FIELDS = frozenset(("prompt", "messages", "conversations", "instruction", "input", "output", "system"))
"""The fields a prompt record's prompt is made of; every other field is one of its columns."""


def read_prompt_rows(
    paths: Sequence[str | Path], columns: Mapping[str, str] | None = None
) -> list[tuple[str, list[Message], dict[str, object]]]:
    """(file:line, prompt conversation, the record's other fields) for PPO/GRPO prompt files, as `read_prompts`;
    the other fields (e.g. an `answer`) go to the reward functions. A GSM8K record ({"question", "answer"}, none
    of PROMPT_FIELDS) is read as it comes: its `question` is the prompt and its `answer` a column."""
    out = []
    for where, record in iter_records(list_files(paths), columns):
        if isinstance(record, dict) and isinstance(record.get("question"), str) and not PROMPT_FIELDS & set(record):
            record = {"prompt": record["question"], **{k: v for k, v in record.items() if k != "question"}}
        if isinstance(record, dict) and "prompt" in record and "completion" not in record:
            msgs = _messages(record["prompt"], where, "prompt")
        elif isinstance(record, dict) and any(k in record for k in ("messages", "conversations", "instruction")):
            full = to_messages(record, where)
            last = max(i for i, m in enumerate(full) if m["role"] == "assistant")
            msgs = full[:last]
        else:
            raise UserError(
                f"{where}: a prompt record needs 'prompt' (a string or a list of messages) or 'question' (GSM8K)"
            )
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise UserError(f"{where}: empty prompt")
        out.append((where, msgs, {k: v for k, v in record.items() if k not in PROMPT_FIELDS}))
    if not out:
        raise UserError(f"the prompt set {', '.join(map(str, paths))} is empty")
    return out


@dataclass(frozen=True)
class Feedback:
    """One unpaired judgement (KTO): a completion of a prompt, desirable or not."""

    prompt: tuple[Message, ...]
    completion: str
    desirable: bool
    where: str = ""


def _label(value: object, where: str) -> bool:
    """A feedback label: a bool, 1 / 0, or their text (CSV cells are text)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise UserError(f"{where}: 'label' must be true or false (or 1 / 0), got {value!r}")


def to_feedback(record: object, where: str) -> list[Feedback]:
    """The feedback rows of one record: a {"prompt", "completion", "label"} row, or the two rows of a preference
    pair (chosen desirable, rejected not)."""
    if isinstance(record, dict) and "label" not in record and ("chosen" in record or "rejected" in record):
        pair = to_pair(record, where)
        return [Feedback(pair.prompt, pair.chosen, True, where), Feedback(pair.prompt, pair.rejected, False, where)]
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("prompt", "completion", "label"):
        if key not in record:
            raise UserError(f"{where}: feedback record has no '{key}' (or give a chosen/rejected pair)")
    prompt = _messages(record["prompt"], where, "prompt")
    completion = _reply(record["completion"], prompt, where, "completion")
    if not completion.strip():
        raise UserError(f"{where}: empty completion")
    return [Feedback(tuple(prompt), completion, _label(record["label"], where), where)]


def read_feedback(paths: Sequence[str | Path], columns: Mapping[str, str] | None = None) -> list[Feedback]:
    """The feedback rows of the files, `columns` applied first; pairs give two rows each."""
    rows = [row for where, record in iter_records(list_files(paths), columns) for row in to_feedback(record, where)]
    if not rows:
        raise UserError(f"no feedback records in {', '.join(map(str, paths))}")
    return rows


def unpaired(pairs: Sequence[PreferencePair]) -> list[Feedback]:
    """Pairs as feedback rows: chosen desirable, rejected not."""
    return [
        Feedback(p.prompt, reply, good, p.where)
        for p in pairs
        for reply, good in ((p.chosen, True), (p.rejected, False))
    ]


# ----------------------------------------------------------------------------------------------------------------
# Tokenized pairs (reward model, DPO)


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    index: int
    probability: float | None = None


def _sides(pair: PreferencePair, tok: Tokenizer) -> tuple[int, list[Example]]:
    """(prompt length, [chosen, rejected]): each side prompt + reply + EOS, labels only on the final reply."""
    n_prompt = len(prompt_ids(list(pair.prompt), tok))
    sides = []
    for reply in (pair.chosen, pair.rejected):
        ex = tokenize_conversation([*pair.prompt, {"role": "assistant", "content": reply}], tok, where=pair.where)
        sides.append(Example(ex.input_ids, [IGNORE_INDEX] * n_prompt + ex.labels[n_prompt:], pair.where))
    return n_prompt, sides


def fit_pair(n_prompt: int, sides: list[Example], limit: int) -> tuple[list[Example] | None, str]:
    """Both sides within `limit` tokens by the policy of data/lengths.py, the shared prompt cut the same on both
    (so they stay a pair), each reply from the right: (sides, "") or (None, why) when the pair cannot be kept."""
    longest = max(len(e.input_ids) for e in sides) - n_prompt
    p, r = kept_lengths(n_prompt, longest, limit)
    kept = slice(n_prompt - p, n_prompt + r)
    cut = [Example(e.input_ids[kept], e.labels[kept], e.where) for e in sides]
    if any(all(label == IGNORE_INDEX for label in e.labels[1:]) for e in cut):
        return None, f"no reply token is left of a pair of {longest + n_prompt} tokens"
    if cut[0].input_ids == cut[1].input_ids:
        return None, f"chosen and rejected are the same in the {r} reply tokens that fit"
    return cut, ""


def tokenize_pair(pair: PreferencePair, tok: Tokenizer, index: int, seq_len: int) -> Pair:
    """Both sides as prompt + reply + EOS, with labels only on the final reply (earlier turns are context), fitted
    to `seq_len + 1` tokens (`fit_pair`); a pair that cannot be kept is an error naming its line."""
    n_prompt, sides = _sides(pair, tok)
    fitted, why = fit_pair(n_prompt, sides, seq_len + 1)
    if fitted is None:
        raise UserError(f"{pair.where}: {why} (train.seq_len + 1 = {seq_len + 1})")
    return Pair(fitted[0], fitted[1], index, pair.probability)


def tokenize_pairs(
    pairs: Sequence[PreferencePair], tok: Tokenizer, limit: int, limit_name: str, max_dropped: float = 1.0
) -> tuple[list[Pair], Tally]:
    """The pairs tokenized and fitted to `limit` tokens (`fit_pair`), numbered 0.. in order; (pairs kept, counts).
    Refused when none is left or more than `max_dropped` of them would be dropped (naming the first)."""
    out, tally = [], Tally("pair", limit_name)
    for pair in pairs:
        n_prompt, sides = _sides(pair, tok)
        fitted, why = fit_pair(n_prompt, sides, limit)
        tally.count(max(len(e.input_ids) for e in sides) > limit, pair.where, why if fitted is None else None)
        if fitted is not None:
            out.append(Pair(fitted[0], fitted[1], len(out), pair.probability))
    tally.check(max_dropped)
    return out, tally


def pair_batch(pairs: list[Pair], pad_id: int, whole: bool = False) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, padded together: one forward scores both. Next-token rows
    (input_ids without the last token, targets) for DPO; `whole` rows (every token, the closing EOS included, and
    the mask) for a reward model, which reads the last token exactly as it will when it scores a finished reply."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if whole:
        ids, mask = right_pad([e.input_ids for e in rows], pad_id)
        batch = {"input_ids": ids, "mask": mask}
    else:
        batch = padded_batch(rows, pad_id)
    batch["index"] = torch.tensor([p.index for p in pairs])
    batch["probability"] = torch.tensor([float("nan") if p.probability is None else p.probability for p in pairs])
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Tokenized feedback rows (KTO)


@dataclass
class Row:
    example: Example
    """prompt + completion + EOS, fitted to the window, labels only on the completion."""
    desirable: bool
    index: int


def tokenize_feedback(
    rows: Sequence[Feedback], tok: Tokenizer, limit: int, limit_name: str, max_dropped: float = 1.0
) -> tuple[list[Row], Tally]:
    """The rows tokenized and fitted to `limit` tokens (chat.fit_example: the prompt cut from the left, the
    completion from the right), numbered 0.. in order; (rows kept, counts). Refused as `tokenize_pairs` is."""
    out, tally = [], Tally("row", limit_name)
    for row in rows:
        n_prompt = len(prompt_ids(list(row.prompt), tok))
        ex = tokenize_conversation(
            [*row.prompt, {"role": "assistant", "content": row.completion}], tok, where=row.where
        )
        ex = Example(ex.input_ids, [IGNORE_INDEX] * n_prompt + ex.labels[n_prompt:], row.where)
        fitted = fit_example(ex, limit)
        why = None if fitted else f"no completion token is left of a row of {len(ex.input_ids)} tokens"
        tally.count(len(ex.input_ids) > limit, row.where, why)
        if fitted is not None:
            out.append(Row(fitted, row.desirable, len(out)))
    tally.check(max_dropped)
    return out, tally


def mismatched(prompt_of: Example, completion_of: Example, limit: int) -> Example:
    """`prompt_of`'s prompt followed by `completion_of`'s completion, fitted to `limit` tokens: a row of KTO's
    reference point, which scores completions under prompts they do not answer."""
    cut = next(i for i, label in enumerate(completion_of.labels) if label != IGNORE_INDEX)
    first = next(i for i, label in enumerate(prompt_of.labels) if label != IGNORE_INDEX)
    ids = prompt_of.input_ids[:first] + completion_of.input_ids[cut:]
    ex = Example(ids, [IGNORE_INDEX] * first + completion_of.labels[cut:], prompt_of.where)
    return fit_example(ex, limit) or ex


def feedback_batch(rows: list[Row], pad_id: int, limit: int) -> dict[str, torch.Tensor]:
    """The rows (input_ids, targets, mask as chat.padded_batch), then under kl_* the same prompts each with the
    previous row's completion (row i with completion i - 1, the last one's going to the first: TRL's KTOTrainer
    shift), `desirable` and `index`."""
    batch = padded_batch([r.example for r in rows], pad_id)
    shifted = [mismatched(r.example, rows[i - 1].example, limit) for i, r in enumerate(rows)]
    batch |= {f"kl_{k}": v for k, v in padded_batch(shifted, pad_id).items()}
    batch["desirable"] = torch.tensor([r.desirable for r in rows])
    batch["index"] = torch.tensor([r.index for r in rows])
    return batch


def split_pairs(data, seed: int, pairs: list | None = None, read=read_preferences) -> tuple[list, list]:
    """(train, validation) pairs from `data` (a PreferenceDataArgs), or from `pairs` when given: val_path when
    set, else a seeded share of them. `read` reads the files (read_feedback: KTO's rows)."""
    pairs = read(data.path, data.columns) if pairs is None else pairs
    if data.val_path:
        return pairs, read(data.val_path, data.columns)
    order = random.Random(seed).sample(range(len(pairs)), len(pairs))
    n_val = int(len(pairs) * data.val_fraction)
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]
