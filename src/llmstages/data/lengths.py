"""One policy for examples longer than the window a stage trains or generates in (SFT, reward, DPO, PPO, GRPO,
CAI and evaluation all use it):

- the prompt is cut from the left (its end, where the reply starts, is kept: TRL's truncation_mode keep_end), the
  reply from the right;
- when both are long the prompt keeps at least half of the window and the reply the rest; so with a window of L
  tokens, a prompt of P and a reply of R, the kept lengths are

      p = min(P, max(L - R, L // 2)),   r = min(R, L - p)

  (an example that fits is unchanged; a short prompt stays whole and the reply is cut; a short reply stays whole
  and the prompt is cut);
- an example that keeps no reply token (or, for a preference pair, whose two replies become the same) is dropped;
- the counts are reported, and the data is refused only when nothing is left or more than `data.max_dropped` of it
  would be dropped, naming the first example dropped.

For generation (PPO, GRPO and CAI prompts) the reply is the `max_new_tokens` to sample, which stays fixed: a
prompt keeps its last `context - max_new_tokens` tokens. An evaluation may also generate fewer tokens instead, by
the rule above (`fit_generation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmstages.errors import UserError


def kept_lengths(prompt: int, reply: int, limit: int) -> tuple[int, int]:
    """(prompt tokens kept from its end, reply tokens kept from its start) of a prompt and reply within `limit`."""
    p = min(prompt, max(limit - reply, limit // 2))
    return p, max(min(reply, limit - p), 0)


def train_window(seq_len: int, context: int, shifted: bool) -> tuple[int, str]:
    """(tokens an example may hold, how to name that limit) for a stage training on `seq_len` with a model of
    `context` tokens: `shifted` rows feed all but the last token and predict all but the first (seq_len + 1 tokens
    make seq_len positions); whole rows (a reward model's) feed every token."""
    limit = seq_len + 1
    if shifted and seq_len > context:
        return context + 1, f"the model's context + 1 = {context + 1}"
    if not shifted and limit > context:
        return context, f"the model's context of {context}"
    return limit, f"train.seq_len + 1 = {limit}"


@dataclass
class Tally:
    """How many examples of a set were cut and dropped to fit `limit` tokens, and why the first dropped one was."""

    kind: str
    """What an example is called in messages: "example", "pair"."""
    limit: str
    """The limit as the user set it, e.g. "train.seq_len + 1 = 65"."""
    total: int = 0
    truncated: int = 0
    dropped: int = 0
    first_dropped: str = ""
    """"file:line: why" of the dropped example that comes first in its file (sets may be shuffled)."""

    def count(self, cut: bool, where: str = "", dropped_why: str | None = None) -> None:
        """One example at `where` (file:line): `cut` when it was shortened; `dropped_why` when it was dropped."""
        self.total += 1
        if dropped_why is not None:
            self.dropped += 1
            if not self.first_dropped or _position(where) < _position(self.first_dropped.split(": ", 1)[0]):
                self.first_dropped = f"{where}: {dropped_why}"
        elif cut:
            self.truncated += 1

    def check(self, max_dropped: float) -> None:
        """Refuse the set when nothing is left or more than `max_dropped` (a share) of it would be dropped."""
        if self.dropped and self.dropped == self.total:
            raise UserError(
                f"none of the {self.total} {self.kind}s fits {self.limit} tokens even when cut; the first: "
                f"{self.first_dropped}; raise train.seq_len"
            )
        if self.dropped > max_dropped * self.total:
            raise UserError(
                f"{self.dropped} of {self.total} {self.kind}s cannot fit {self.limit} tokens even when cut (more than "
                f"data.max_dropped={max_dropped:g} of them); the first: {self.first_dropped}; raise train.seq_len, "
                "or data.max_dropped to train on the rest"
            )

    def summary(self) -> str:
        return f"{self.truncated} truncated, {self.dropped} dropped to fit {self.limit} tokens"

    def metrics(self) -> dict[str, int]:
        """The counts as the step-0 record holds them."""
        return {"truncated_examples": self.truncated, "dropped_examples": self.dropped}

    def __add__(self, other: Tally) -> Tally:
        firsts = [f for f in (self.first_dropped, other.first_dropped) if f]
        first = min(firsts, key=lambda f: _position(f.split(": ", 1)[0]), default="")
        return Tally(
            self.kind,
            self.limit,
            self.total + other.total,
            self.truncated + other.truncated,
            self.dropped + other.dropped,
            first,
        )


def _position(where: str) -> tuple[str, int]:
    """ "file:line" -> (file, line), for finding the first of several places."""
    head, _, tail = where.rpartition(":")
    return (head, int(tail)) if tail.isdigit() else (where, 0)


def check_room(max_new_tokens: int, context: int, key: str) -> int:
    """The prompt tokens that fit beside `max_new_tokens` new ones in `context`; an error naming `key` when none."""
    room = context - max_new_tokens
    if room < 1:
        raise UserError(
            f"{key}={max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens; lower it"
        )
    return room


def fit_prompts(
    prompts: Sequence[list[int]], max_new_tokens: int, context: int, key: str
) -> tuple[list[list[int]], int]:
    """(each prompt's last `context - max_new_tokens` tokens, how many prompts were cut): room for the reply to
    sample. `key` names the setting in the error when no prompt token would be left."""
    room = check_room(max_new_tokens, context, key)
    return [list(p[-room:]) for p in prompts], sum(len(p) > room for p in prompts)


@dataclass
class GenerationFit:
    """Prompts fitted for an evaluation that generates `max_new_tokens` after each of them."""

    prompts: list[list[int]]
    max_new_tokens: int
    cut: int
    """Prompts cut from the left."""
    asked: int
    """The new tokens asked for (more than `max_new_tokens` when fewer had to be generated)."""

    def note(self, context: int) -> str | None:
        """One line saying what was changed to fit the context, or None when nothing was."""
        fewer = self.max_new_tokens < self.asked
        if not self.cut and not fewer:
            return None
        kept = max(map(len, self.prompts))
        new = f", {self.max_new_tokens} new tokens instead of {self.asked}" if fewer else ""
        return (
            f"{self.cut} of {len(self.prompts)} evaluation prompts cut from the left to {kept} tokens{new}, to fit "
            f"the model's context of {context} tokens"
        )


def fit_generation(prompts: Sequence[list[int]], max_new_tokens: int, context: int) -> GenerationFit:
    """The prompts and the number of new tokens of an evaluation within `context`, by `kept_lengths` on the longest
    prompt: prompts cut from the left, and fewer new tokens only when the prompt would otherwise keep less than
    half the context. Refused only when not one prompt token and one new token fit."""
    longest = max((len(p) for p in prompts), default=0)
    p, n = kept_lengths(longest, max_new_tokens, context)
    if n < 1 or (longest and p < 1):
        raise UserError(f"the model's context of {context} tokens has no room for an evaluation prompt and its reply")
    cut = [list(x[-p:]) if len(x) > p else list(x) for x in prompts]
    return GenerationFit(cut, n, sum(len(x) > p for x in prompts), max_new_tokens)
