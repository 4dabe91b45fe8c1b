"""One exception type for bad input: the CLI prints its message on one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave us (a path, a file, a config key), not a bug.

    The message names the file, line or key and what is wrong; the CLI prints it without a traceback.
    """


def closest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean X?)' for the closest of `choices`, or '' when none is close."""
    import difflib

    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
