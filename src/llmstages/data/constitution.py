"""A constitution (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback"): principles, each with a
critique request, a revision request and a comparison question for pairwise feedback.

YAML, a list under `principles`:

    options: ["A", "B"]            # the answers a comparison question expects, first = the first response
    principles:
      - name: concise
        critique: "Is the answer '{response}' short?"
        revision: "Shorten the answer '{response}'"
        comparison: "Which answer is shorter, (A) '{a}' or (B) '{b}'?"

Placeholders: `{prompt}` (the user's request), `{response}` (the reply under critique), `{critique}` (the
critique just given; revision only), `{a}` and `{b}` (the two replies; comparison only). Each request is sent to
the feedback model as one user turn of its chat format.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from llmstages.errors import UserError

FIELDS = {
    "critique": {"prompt", "response"},
    "revision": {"prompt", "response", "critique"},
    "comparison": {"prompt", "a", "b"},
}


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    comparison: str

    def critique_request(self, prompt: str, response: str) -> str:
        return self.critique.format(prompt=prompt, response=response)

    def revision_request(self, prompt: str, response: str, critique: str) -> str:
        return self.revision.format(prompt=prompt, response=response, critique=critique)

    def comparison_request(self, prompt: str, a: str, b: str) -> str:
        return self.comparison.format(prompt=prompt, a=a, b=b)


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    options: tuple[str, str] = ("A", "B")

    def pick(self, names: list[str] | tuple[str, ...]) -> list[Principle]:
        """The principles named (all when `names` is empty); an unknown name is an error."""
        if not names:
            return list(self.principles)
        by_name = {p.name: p for p in self.principles}
        for n in names:
            if n not in by_name:
                raise UserError(f"principle '{n}' is not in the constitution (it has {', '.join(by_name)})")
        return [by_name[n] for n in names]


def _placeholders(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def load_constitution(path: str | Path) -> Constitution:
    """Read and check a constitution file: at least one principle, every request present and using only its
    placeholders, two distinct options."""
    import yaml

    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read the constitution ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: the constitution is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("principles"), list) or not tree["principles"]:
        raise UserError(f"{path}: a constitution needs a non-empty list under 'principles'")
    principles = []
    for i, p in enumerate(tree["principles"]):
        where = f"{path}: principles[{i}]"
        if not isinstance(p, dict):
            raise UserError(f"{where}: a principle is a mapping with name, critique, revision and comparison")
        for key in ("name", *FIELDS):
            if not isinstance(p.get(key), str) or not p[key].strip():
                raise UserError(f"{where} ({p.get('name', 'unnamed')}): '{key}' is missing or empty")
        for key, allowed in FIELDS.items():
            try:
                unknown = _placeholders(p[key]) - allowed
            except ValueError as e:
                raise UserError(f"{where} ({p['name']}): '{key}' is not a valid template ({e})") from None
            if unknown:
                raise UserError(
                    f"{where} ({p['name']}): '{key}' uses {{{sorted(unknown)[0]}}}; "
                    f"it may use {', '.join('{' + a + '}' for a in sorted(allowed))}"
                )
        if not {"a", "b"} <= _placeholders(p["comparison"]):
            raise UserError(f"{where} ({p['name']}): 'comparison' must show both replies, {{a}} and {{b}}")
        principles.append(Principle(p["name"], p["critique"], p["revision"], p["comparison"]))
    names = [p.name for p in principles]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: principle names must be distinct")
    options = tree.get("options", ["A", "B"])
    if not (
        isinstance(options, list)
        and len(options) == 2
        and all(isinstance(o, str) and o for o in options)
        and options[0] != options[1]
    ):
        raise UserError(f"{path}: 'options' must be two different non-empty strings, got {options!r}")
    return Constitution(tuple(principles), (options[0], options[1]))
