"""Built-in verifiable rewards for PPO and GRPO, named in a recipe as `module:function`:

    reward.fns=[llmstages.rewards:accuracy,llmstages.rewards:format] reward.weights=[1.0,0.5]

Every reward function is called as f(prompts, responses, ended, **columns) -> one float per reply, where each
column of the prompt file other than the prompt (e.g. `answer`) comes as a list aligned with the replies (TRL's
convention); a function receives the columns it names, or all of them when it takes **kwargs. Pure Python: these
need neither torch nor a tokenizer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

# A number as people write one: an optional minus (not one between two numbers, as in 3-5), digits with optional
# thousands commas (1,234), an optional decimal part. A trailing full stop is not part of it.
NUMBER = re.compile(r"(?:(?<![\d.])-)?\d+(?:,\d{3})*(?:\.\d+)?")
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
ONLY_A_NUMBER = re.compile(r"\s*-?\d+(?:,\d{3})*(?:\.\d+)?\.?\s*")


def _value(text: str) -> float:
    return float(text.replace(",", ""))


def last_number(text: str) -> float | None:
    """The last number written in `text` (commas as thousands separators), or None."""
    found = NUMBER.findall(text)
    return _value(found[-1]) if found else None


def extract_answer(text: str) -> float | None:
    """The number a reply gives as its answer: inside the last `\\boxed{...}`, else the number after the last
    `####` (GSM8K's marker), else the last number in the reply; None when there is none."""
    boxed = BOXED.findall(text)
    if boxed:
        return last_number(boxed[-1])
    if "####" in text:
        return last_number(text.rsplit("####", 1)[1])
    return last_number(text)


def _reference(answer: object) -> float | None:
    """The `answer` column as a number: a number, or text read as a reply is (so a GSM8K answer's `#### N`)."""
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, int | float):
        return float(answer)
    return extract_answer(str(answer))


def accuracy(
    prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool], answer: Sequence[object], **_: object
) -> list[float]:
    """1.0 when the reply's answer equals the row's `answer` column numerically, else 0.0.

    The reply's answer is the content of its last `\\boxed{}`, else the number after its last `####`, else its last
    number (commas as thousands separators: `1,234` is 1234; `-3` and `2.5` are read as written). The `answer`
    column is a number, or text read the same way, so a GSM8K answer ending in `#### 1,234` gives 1234. Equal means
    within 1e-6 relative (or absolute, near zero). No number in the reply, or none in the answer: 0.0."""
    scores = []
    for reply, ref in zip(responses, answer, strict=True):
        got, want = extract_answer(reply), _reference(ref)
        ok = got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6)
        scores.append(1.0 if ok else 0.0)
    return scores


def format(prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool], **_: object) -> list[float]:
    """1.0 when the reply is only a number (as `accuracy` reads one: `-12`, `1,234`, `2.5`), with optional
    whitespace around it and an optional full stop after it; else 0.0. An answer-only format: `The answer is 4`
    and `\\boxed{4}` score 0.0."""
    return [1.0 if ONLY_A_NUMBER.fullmatch(r) else 0.0 for r in responses]


OVERLONG_MAX = 1024
"""L_max of `overlong`, in characters."""
OVERLONG_CACHE = 256
"""L_cache of `overlong`, in characters: the penalty rises over the last OVERLONG_CACHE characters before L_max."""


def overlong_penalty(length: int, max_length: int, cache: int) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of a reply of `length`:
    0 when length <= max_length - cache; ((max_length - cache) - length) / cache, falling linearly from 0 to -1,
    when max_length - cache < length <= max_length; -1 beyond max_length."""
    if length <= max_length - cache:
        return 0.0
    if length <= max_length:
        return ((max_length - cache) - length) / cache
    return -1.0


def make_overlong(max_length: int, cache: int) -> Callable[..., list[float]]:
    """An `overlong` reward with other limits (in characters), to define in one's own module:
    `my_overlong = make_overlong(200, 50)`, then `reward.fns=[my_module:my_overlong]`."""
    if not 0 < cache <= max_length:
        raise ValueError(f"overlong needs 0 < cache <= max_length, got cache={cache}, max_length={max_length}")

    def overlong(prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool], **_: object) -> list[float]:
        return [overlong_penalty(len(r), max_length, cache) for r in responses]

    overlong.__doc__ = f"overlong_penalty of each reply's length in characters, L_max={max_length}, L_cache={cache}."
    return overlong


def overlong(prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool], **_: object) -> list[float]:
    """DAPO's soft overlong penalty (`overlong_penalty`) of each reply, its length measured in characters (reward
    functions see text, not tokens; about 4 characters a token in English BPE vocabularies), with
    L_max = OVERLONG_MAX = 1024 and L_cache = OVERLONG_CACHE = 256: 0 up to 768 characters, then linearly down to
    -1 at 1024, -1 beyond. Other limits: `make_overlong`."""
    return [overlong_penalty(len(r), OVERLONG_MAX, OVERLONG_CACHE) for r in responses]
