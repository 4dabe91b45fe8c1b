"""`llmstages generate` and `llmstages chat`: a model directory continuing one prompt, or holding a conversation
through its chat template with the reply streamed as it is sampled."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from llmstages.data.chat import prompt_ids
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model import GPT, Generation, generate
from llmstages.model.generate import check_temperature
from llmstages.store import load_model_and_tokenizer
from llmstages.train.start import resolve_device


@dataclass
class Sampling:
    """How to sample: temperature 0 is greedy; `device` is auto, cpu, cuda, cuda:1, ..."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        check_temperature(self.temperature, "--temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be at least 1, got {self.top_k}")


def _load(model_path: str, s: Sampling) -> tuple[GPT, Tokenizer, torch.Generator]:
    s.check()
    device = str(resolve_device(s.device, "--device"))
    model, tok = load_model_and_tokenizer(model_path, device=device)
    return model, tok, torch.Generator(device=device).manual_seed(s.seed)


def _continue(model: GPT, tok: Tokenizer, ids: list[int], s: Sampling, gen, on_token=None) -> Generation:
    """One prompt continued as `s` says, up to the end of the context or an EOS of the model's."""
    eos = model.config.eos_ids or ([tok.eos_id] if tok.eos_id is not None else None)
    room = model.config.block_size - len(ids)
    return generate(
        model,
        [ids],
        min(s.max_new_tokens, room),
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        eos_id=eos,
        pad_id=tok.pad_id,
        generator=gen,
        on_token=on_token,
    )


def generate_text(model_path: str, prompt: str, s: Sampling) -> str:
    """The prompt and its continuation, as text."""
    model, tok, gen = _load(model_path, s)
    ids = tok.encode(prompt, add_special_tokens=True)
    if not ids:
        raise UserError("--prompt is empty")
    context = model.config.block_size
    if len(ids) >= context:
        raise UserError(f"--prompt is {len(ids)} tokens, longer than the model's context of {context} tokens")
    out = _continue(model, tok, ids, s, gen)
    return tok.decode(out.tokens[0, : int(out.lengths[0])].tolist())


class _Streamed:
    """A reply printed as its tokens arrive: the whole reply is decoded each time and the new part printed, so a
    character split over several tokens comes out whole."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.ids, self.shown = tok, [], ""

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        now = self.tok.decode(self.ids)
        print(now[len(self.shown) :], end="", flush=True)
        self.shown = now


CHAT_COMMANDS = {"/reset": "start the conversation over", "/exit": "end the chat (so does end of input)"}


def _read_turn(n: int) -> str:
    """Line `n` of stdin ("" at its end); bytes that are not UTF-8 text, or NUL bytes, are an error."""
    try:
        line = sys.stdin.readline()
        line.encode("utf-8")  # a stdin decoding with surrogateescape passes undecodable bytes on as surrogates
    except UnicodeError:
        raise UserError(f"stdin: not UTF-8 text at or near line {n} (binary input?)") from None
    if "\x00" in line:
        raise UserError(f"stdin: line {n} holds NUL bytes (binary input?)")
    return line


def chat(model_path: str, s: Sampling, system: str | None = None) -> int:
    """A multi-turn chat through the model's chat template, replies streamed as they are generated. Reads one
    user turn a line from stdin (a terminal or a pipe); /reset forgets the conversation, /exit (or end of input)
    ends it; any other line starting with / is an unknown command, never sent to the model."""
    model, tok, gen = _load(model_path, s)
    opening = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chat with {model_path}: type a message; /reset starts over, /exit (or Ctrl-D) ends")
    history: list[dict[str, str]] = []
    n = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        n += 1
        line = _read_turn(n)
        text = line.strip()
        command = text.split()[0] if text.startswith("/") else None
        if not line or command == "/exit":
            return 0
        if command == "/reset":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        if command is not None:
            known = "; ".join(f"{c}: {what}" for c, what in CHAT_COMMANDS.items())
            print(f"(unknown command {command}, not sent to the model; commands: {known})", flush=True)
            continue
        if not text:
            continue
        turn = [{"role": "user", "content": text}]
        ids = prompt_ids(opening + history + turn, tok)
        if model.config.block_size - len(ids) < 1:
            print(f"(the conversation fills the model's context of {model.config.block_size} tokens; /reset)")
            continue
        reply = _Streamed(tok)
        _continue(model, tok, ids, s, gen, on_token=reply)
        print(flush=True)
        history += [*turn, {"role": "assistant", "content": tok.decode(reply.ids).strip()}]
