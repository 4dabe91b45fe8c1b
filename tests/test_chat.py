"""`llmstages chat` driven through stdin: two turns, each prompt the chat template of the whole conversation so
far (prompt_ids of the same messages), /reset forgetting it, /exit ending."""

from __future__ import annotations

import io

import pytest

import llmstages.chat as chat_module
import llmstages.model as model_pkg
from llmstages.cli import main
from llmstages.data.chat import prompt_ids
from llmstages.store import load_tokenizer
from tests.helpers import builtin_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return builtin_base(tmp_path_factory.mktemp("chat") / "base")


def test_two_turns_then_reset(base, monkeypatch, capsys):
    prompts, replies = [], []
    real = model_pkg.generate

    def spy(model, ids, *args, **kwargs):
        prompts.append(list(ids[0]))
        out = real(model, ids, *args, **kwargs)
        replies.append(out.tokens[0, : int(out.lengths[0])].tolist())
        return out

    monkeypatch.setattr(chat_module, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Where does Ada live?\nAnd Bram?\n/reset\nHello\n/exit\nnever read\n"))
    argv = ["chat", "--model", str(base), "--system", "Be brief.", "--max-new-tokens", "6", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(base)
    first = tok.decode(replies[0]).strip()
    system = {"role": "system", "content": "Be brief."}
    want = [
        [system, {"role": "user", "content": "Where does Ada live?"}],
        [system, {"role": "user", "content": "Where does Ada live?"}, {"role": "assistant", "content": first},
         {"role": "user", "content": "And Bram?"}],
        [system, {"role": "user", "content": "Hello"}],  # after /reset
    ]  # fmt: skip
    assert prompts == [prompt_ids(m, tok) for m in want]
    assert "(conversation cleared)" in out and len(prompts) == 3  # /exit: the last line is never read
    for r in replies:  # each reply was printed (streamed) as decoded
        assert tok.decode(r) in out


def test_bad_sampling_options(base, capsys):
    assert main(["chat", "--model", str(base), "--temperature", "-1"]) == 2
    assert "--temperature must be >= 0" in capsys.readouterr().err


def _stdin(data: bytes, errors: str = "strict") -> io.TextIOWrapper:
    """stdin as Python opens it: bytes decoded as UTF-8 (with surrogateescape in a POSIX locale)."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors=errors)


@pytest.mark.parametrize(
    ("data", "errors", "says"),
    [
        (b"Hello\n\xff\xfe\x00\x01 binary\n", "strict", "stdin: not UTF-8 text at or near line 1 (binary input?)"),
        (b"Hello\n\xff\xfe binary\n", "surrogateescape", "stdin: not UTF-8 text at or near line 2 (binary input?)"),
        (b"/reset\nHel\x00lo\n", "strict", "stdin: line 2 holds NUL bytes (binary input?)"),
    ],
    ids=["strict", "surrogateescape", "nul"],
)
def test_binary_stdin_is_one_line_and_exit_2(base, monkeypatch, capsys, data, errors, says):
    sent = []
    monkeypatch.setattr(chat_module, "generate", lambda *a, **k: sent.append(a))
    monkeypatch.setattr("sys.stdin", _stdin(data, errors))
    assert main(["chat", "--model", str(base), "--max-new-tokens", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"llmstages: error: {says}\n", err
    assert len(sent) <= 1  # "Hello" at most; the binary line never reaches the model


def test_an_unknown_command_is_not_sent(base, monkeypatch, capsys):
    prompts = []
    real = model_pkg.generate

    def spy(model, ids, *args, **kwargs):
        prompts.append(list(ids[0]))
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(chat_module, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("/foo bar\n/help\nWhere does Ada live?\n/exit\n"))
    assert main(["chat", "--model", str(base), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "(unknown command /foo, not sent to the model; commands: /reset: " in out
    assert "(unknown command /help," in out and "/exit: end the chat" in out
    tok = load_tokenizer(base)
    assert prompts == [prompt_ids([{"role": "user", "content": "Where does Ada live?"}], tok)]  # only the question
