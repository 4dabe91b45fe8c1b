"""Tokenizers: read and write `tokenizer.json` (the `tokenizers` library's format, which HF fast tokenizers use),
with the special tokens and the chat template that HF keeps in `tokenizer_config.json`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmstages.errors import UserError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# Chat roles for the built-in template (see data/chat.py): each opens a turn; EOS closes it.
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)


def _token_str(value: Any) -> str | None:
    """HF writes special tokens as a string or as {"content": str, ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of its special tokens and an optional jinja chat template."""

    def __init__(
        self,
        tk: HFTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.tk = tk
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        for name in ("bos_token", "eos_token", "pad_token"):
            tok = getattr(self, name)
            if tok is not None and tk.token_to_id(tok) is None:
                raise UserError(f"tokenizer: {name} '{tok}' is not in the vocabulary")

    def to_spec(self) -> tuple[str, str | None, str | None, str | None, str | None]:
        """Everything that defines the tokenizer, as plain strings (to send to another process)."""
        return self.tk.to_str(), self.bos_token, self.eos_token, self.pad_token, self.chat_template

    @classmethod
    def from_spec(cls, spec: tuple[str, str | None, str | None, str | None, str | None]) -> Tokenizer:
        return cls(HFTokenizer.from_str(spec[0]), *spec[1:])

    # -- ids -----------------------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.tk.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.tk.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        """The pad id; falls back to EOS (then 0) when the tokenizer has no pad token, as HF models often do."""
        for tok in (self.pad_token, self.eos_token):
            if tok is not None:
                return self.tk.token_to_id(tok)
        return 0

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    # -- text ----------------------------------------------------------------------------------------------------
    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, add_special_tokens: bool = False
    ) -> list[int]:
        """Token ids of `text`. `add_special_tokens` applies the tokenizer's own post-processor (an HF Llama
        tokenizer's BOS, say); `add_bos`/`add_eos` add ours explicitly."""
        ids = self.tk.encode(text, add_special_tokens=add_special_tokens).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- files ---------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory holding `tokenizer.json` (or GPT-2's `vocab.json` + `merges.txt`)."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            try:
                tk = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:
                raise UserError(f"{path / 'tokenizer.json'}: not a valid tokenizer file ({e})") from None
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tk = HFTokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tk.decoder = decoders.ByteLevel()
        else:
            raise UserError(f"{path}: no tokenizer.json (or vocab.json + merges.txt) in this directory")
        conf: dict[str, Any] = {}
        conf_path = path / "tokenizer_config.json"
        if conf_path.is_file():
            try:
                conf = json.loads(conf_path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{conf_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        template = conf.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        specials = {k: _token_str(conf.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        if not any(specials.values()):  # our own tokenizers name them by convention
            vocab = tk.get_vocab(with_added_tokens=True)
            specials = {k: t if t in vocab else None for k, t in zip(specials, (BOS, EOS, PAD))}
        return cls(tk, chat_template=template, **specials)

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` and an HF-readable `tokenizer_config.json`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(path / "tokenizer.json"))
        conf: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
        }
        for name in ("bos_token", "eos_token", "pad_token"):
            if getattr(self, name) is not None:
                conf[name] = getattr(self, name)
        if self.chat_template is not None:
            conf["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Train a byte-level BPE (as GPT-2's) on `texts`; the special tokens get the first ids."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    names = set(special_tokens)
    return Tokenizer(
        tk,
        bos_token=BOS if BOS in names else None,
        eos_token=EOS if EOS in names else None,
        pad_token=PAD if PAD in names else None,
    )
