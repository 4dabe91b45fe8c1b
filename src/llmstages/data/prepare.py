"""`llmstages tokenizer`: a byte-level BPE tokenizer trained on text files (or the built-in corpus), and optionally
the text tokenized into `train.bin`/`val.bin` shards, written together into one folder or not at all."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llmstages.data.builtin import builtin_corpus
from llmstages.data.tasks import answer_lines
from llmstages.data.text import iter_documents, prepare_shards
from llmstages.data.tokenizer import train_bpe
from llmstages.errors import UserError
from llmstages.outputs import claim_folder, disk_full_is_an_error, refuse_through_file, write_dir


def prepare_tokenizer(
    out_path: str | Path,
    data: Sequence[str] = (),
    vocab_size: int = 2048,
    tokenize: bool = False,
    val_fraction: float = 0.05,
    workers: int = 2,
) -> None:
    """Train the tokenizer on `data` (files or folders; none: the built-in corpus with the task answers) and write it
    to `out_path`, a new or empty folder or an earlier tokenizer folder; with `tokenize` the shards go beside it."""
    if vocab_size < 300:
        raise UserError(f"--vocab-size must be at least 300 (256 bytes plus merges), got {vocab_size}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    out = Path(out_path)
    refuse_through_file(out, "--out")
    ours = {"tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin", "meta.json"}
    claim_folder(out, "--out", lambda p: {q.name for q in p.iterdir()} <= ours and (p / "tokenizer.json").is_file())
    docs = list(iter_documents(data)) if data else builtin_corpus()
    if not any(d.strip() for d in docs):
        raise UserError("the data holds no text")
    tok = train_bpe(docs if data else [*docs, *answer_lines()], vocab_size)
    meta: dict = {}

    def fill(tmp: Path) -> None:  # the tokenizer and its shards land together, or not at all
        tok.save(tmp)
        if tokenize:
            meta.update(
                prepare_shards(docs, tok, tmp, val_fraction, workers=workers, source=",".join(data) or "builtin")
            )

    with disk_full_is_an_error(out, "tokenizer folder"):  # written whole or not at all
        write_dir(out, fill)
    print(f"tokenizer: {tok.vocab_size} tokens, written to {out}")
    if meta:
        print(f"shards: {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens in {out}")
