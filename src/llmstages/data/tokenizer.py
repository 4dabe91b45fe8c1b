"""Tokenizers: read and write `tokenizer.json` (the `tokenizers` library's format, which HF fast tokenizers use),
with the special tokens and the chat template that HF keeps in `tokenizer_config.json`.

A jinja chat template is compiled and rendered as transformers does (a sandboxed environment with `loopcontrols`,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, the `{% generation %}` tag), and is
checked when the tokenizer is loaded: one that does not compile (a syntax error, an unknown filter) or fails on a
plain two-turn conversation is an error naming the file it came from, before anything runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmstages.data.records import read_json_object, read_text
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


# ----------------------------------------------------------------------------------------------------------------
# Chat templates


class TemplateRaised(UserError):
    """A chat template called `raise_exception(message)`: it works, and refuses this conversation."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    """transformers' `tojson`: plain JSON, non-ASCII kept (jinja's own escapes HTML characters)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.cache
def _template_env() -> Any:
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - torch depends on jinja2
        raise UserError("a jinja chat template needs the jinja2 package (pip install jinja2)") from None

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str, source: str = "chat template") -> Any:
    """The compiled jinja template; one that does not compile (a syntax error, an unknown filter or test) is an
    error naming `source` and the template's line."""
    import jinja2

    env = _template_env()
    try:
        compiled = env.from_string(template)
        tree = env.parse(template)
    except jinja2.TemplateSyntaxError as e:  # unknown filters and tests too (TemplateAssertionError)
        raise UserError(
            f"{source}: the chat template does not compile (template line {e.lineno}: {e.message})"
        ) from None
    except jinja2.TemplateError as e:
        raise UserError(f"{source}: the chat template does not compile ({e.message})") from None
    # jinja defers an unknown filter or test inside a branch to the moment it runs: find them all now
    for kind, known in ((jinja2.nodes.Filter, env.filters), (jinja2.nodes.Test, env.tests)):
        for node in tree.find_all(kind):
            if node.name not in known:
                what = "filter" if kind is jinja2.nodes.Filter else "test"
                raise UserError(
                    f"{source}: the chat template does not compile (template line {node.lineno}: No {what} named "
                    f"'{node.name}'.)"
                )
    return compiled


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    bos_token: str = "",
    eos_token: str = "",
    source: str = "chat template",
) -> str:
    """`messages` through the jinja `template`; a template that fails on them is an error naming `source`
    (its own `raise_exception` gives the template's message)."""
    compiled = compile_chat_template(template, source)
    try:
        return compiled.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except TemplateRaised as e:  # the template's own refusal: its message, and where the template came from
        raise TemplateRaised(f"{source}: {e}") from None
    except UserError:
        raise
    except Exception as e:  # a template is the user's code: undefined names, wrong types, sandbox refusals
        text = " ".join(str(e).split())
        raise UserError(f"{source}: the chat template failed ({type(e).__name__}: {text})") from None


def check_chat_template(template: str, source: str, bos_token: str = "", eos_token: str = "") -> None:
    """Compile `template` and render a plain conversation (user, assistant) and a prompt for a reply with it; a
    template that refuses them with its own `raise_exception` passes (it works, and has rules of its own)."""
    turns = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]
    for messages, add_generation_prompt in ((turns, False), (turns[:1], True)):
        with contextlib.suppress(TemplateRaised):
            render_chat_template(template, messages, add_generation_prompt, bos_token, eos_token, source)


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of its special tokens and an optional jinja chat template
    (`template_source` names where it came from, for messages)."""

    def __init__(
        self,
        tk: HFTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        template_source: str = "chat template",
    ) -> None:
        self.tk = tk
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.template_source = template_source
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

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """`messages` rendered with the jinja `chat_template` (which must be set), as transformers renders them."""
        if self.chat_template is None:
            raise ValueError("the tokenizer has no jinja chat template")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt,
            self.bos_token or "",
            self.eos_token or "",
            self.template_source,
        )

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
            try:
                tk = HFTokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
            except Exception as e:
                raise UserError(f"{path}: vocab.json + merges.txt are not a valid BPE tokenizer ({e})") from None
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tk.decoder = decoders.ByteLevel()
        else:
            raise UserError(f"{path}: no tokenizer.json (or vocab.json + merges.txt) in this directory")
        conf: dict[str, Any] = {}
        conf_path = path / "tokenizer_config.json"
        if conf_path.is_file():
            conf = read_json_object(conf_path)
        template, source = _template_of(conf, conf_path), str(conf_path)
        if template is None and (path / "chat_template.jinja").is_file():
            template, source = read_text(path / "chat_template.jinja"), str(path / "chat_template.jinja")
        specials = {k: _token_str(conf.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        if not any(specials.values()):  # our own tokenizers name them by convention
            vocab = tk.get_vocab(with_added_tokens=True)
            specials = {k: t if t in vocab else None for k, t in zip(specials, (BOS, EOS, PAD))}
        if template is not None:
            check_chat_template(template, source, specials["bos_token"] or "", specials["eos_token"] or "")
        return cls(tk, chat_template=template, template_source=source, **specials)

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


def _template_of(conf: dict[str, Any], source: Path) -> str | None:
    """The chat template of a tokenizer_config.json: a string, or the one named "default" of a list of
    {name, template}; any other value is an error naming the file."""
    template = conf.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
            raise UserError(f"{source}: 'chat_template' as a list must hold {{name, template}} objects")
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise UserError(f"{source}: 'chat_template' must be a string, got {type(template).__name__}")
    return template


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
