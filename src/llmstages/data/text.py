"""Pre-training data: documents from text files and record files (data/records.py), tokenized once into token
shards, sampled by step.

Shards are flat arrays of token ids (`train.bin`, `val.bin`, uint16 when the vocabulary fits, else uint32) with
a `meta.json`; documents are joined with EOS, and whole documents go to the validation split. Batches are
random windows drawn by a generator seeded with (seed, step, micro-batch, rank), so a run resumed at step k
sees exactly the batches an uninterrupted run sees, and every rank knows every other rank's data.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llmstages.data.records import (
    RECORD_SUFFIXES,
    dataset_folder,
    is_records,
    iter_records,
    read_json_object,
    read_text,
    why_missing,
)
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".text")
META = "meta.json"


# ----------------------------------------------------------------------------------------------------------------
# Reading documents


def list_files(paths: Sequence[str | Path]) -> list[Path]:
    """The data files under `paths` (files, or folders searched recursively; a `datasets.save_to_disk` folder
    gives its Arrow shards in order), sorted; clear errors when none."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"data path '{raw}' {why_missing(p)}")
        if not p.is_dir():
            files.append(p)
            continue
        found: list[Path] = []
        datasets = sorted(d for d in [p, *p.rglob("*")] if d.is_dir() and dataset_folder(d) is not None)
        for d in datasets:
            found += dataset_folder(d) or []
        for f in sorted(p.rglob("*")):
            inside = any(d == f.parent or d in f.parents for d in datasets)
            if f.is_file() and not inside and (f.suffix.lower() in TEXT_SUFFIXES or is_records(f)):
                found.append(f)
        if not found:
            raise UserError(f"data folder '{raw}' has no {', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)} files")
        files += found
    return files


def _text_of(record: object, where: str, field: str = "text") -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with a '{field}' field, got {type(record).__name__}")
    if field not in record:
        raise UserError(
            f"{where}: no '{field}' field (keys: {', '.join(map(str, record)) or 'none'}); map one to it with "
            f"data.columns={{{field}: NAME}}"
        )
    if not isinstance(record[field], str):
        raise UserError(f"{where}: '{field}' must be a string, got {type(record[field]).__name__}")
    return record[field]


def read_documents(path: Path, columns: Mapping[str, str] | None = None) -> Iterator[str]:
    """Documents of one file: a text file is one document; a record file (JSONL, Parquet, Arrow, CSV) gives one
    per record's `text` (after `columns`)."""
    if is_records(path):
        for where, record in iter_records([path], columns):
            yield _text_of(record, where)
    else:
        yield read_text(path)


def iter_documents(paths: Sequence[str | Path], columns: Mapping[str, str] | None = None) -> Iterator[str]:
    for f in list_files(paths):
        yield from read_documents(f, columns)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing into shards

_worker_tok: Tokenizer | None = None


def _init_worker(tokenizer_json: str, specials: dict) -> None:
    global _worker_tok
    from tokenizers import Tokenizer as HFTokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = Tokenizer(HFTokenizer.from_str(tokenizer_json), **specials)


def _encode_chunk(docs: list[str]) -> list[list[int]]:
    assert _worker_tok is not None
    return _worker_tok.encode_batch(docs)


def _chunks(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.tk.to_str().encode()).hexdigest()[:16]


def val_picker(val_fraction: float, seed: int):
    """Called once per document in order: True for the documents held out for validation."""
    pick = random.Random(seed)
    return lambda: pick.random() < val_fraction


def prepare_shards(
    documents: Iterator[str] | Sequence[str],
    tok: Tokenizer,
    out: str | Path,
    val_fraction: float = 0.05,
    seed: int = 0,
    workers: int = 2,
    source: str = "",
) -> dict:
    """Tokenize documents into `out/train.bin`, `out/val.bin` and `out/meta.json`; returns the meta.

    Written into a temporary folder and moved into `out` at the end: a failure (a bad record, say) leaves
    nothing behind and changes nothing in `out`; other files in `out` are left alone.
    """
    if tok.eos_id is None:
        raise UserError("the tokenizer has no EOS token; documents are joined with EOS")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    is_val = val_picker(val_fraction, seed)
    counts = {"train": 0, "val": 0}
    n_docs = 0
    specials = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}
    pool = None
    try:
        files = {s: open(tmp / f"{s}.bin", "wb") for s in counts}
        chunks = _chunks(iter(documents), 256)
        if workers > 1:
            pool = mp.get_context("fork").Pool(workers, _init_worker, (tok.tk.to_str(), specials))
            encoded = pool.imap(_encode_chunk, chunks)
        else:
            encoded = (tok.encode_batch(c) for c in chunks)
        bar = tqdm(desc="tokenizing", unit=" docs", mininterval=1.0, leave=False, disable=None)
        for batch in encoded:
            for ids in batch:
                split = "val" if is_val() else "train"
                arr = np.asarray([*ids, tok.eos_id], dtype=dtype)
                files[split].write(arr.tobytes())
                counts[split] += arr.size
                n_docs += 1
            bar.update(len(batch))
        bar.close()
        for f in files.values():
            f.close()
        if n_docs == 0:
            raise UserError(f"no documents found in {source or 'the data'}")
        if counts["train"] == 0:
            raise UserError(f"{source or 'the data'}: every document went to validation; lower data.val_fraction")
        meta = {
            "dtype": np.dtype(dtype).name,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "documents": n_docs,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "tokenizer": tokenizer_hash(tok),
            "source": source,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        (out / META).unlink(missing_ok=True)  # the folder reads as prepared again only once all files are in
        for name in ("train.bin", "val.bin", META):
            os.replace(tmp / name, out / name)
        return meta
    finally:
        if pool is not None:
            pool.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Sampling


@dataclass
class TokenShards:
    """Memory-mapped train/val token arrays of a shard folder."""

    path: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray

    @classmethod
    def open(cls, path: str | Path) -> TokenShards:
        path = Path(path)
        if not (path / META).is_file():
            raise UserError(f"{path}: not a token shard folder (no {META})")
        meta = read_json_object(path / META)
        try:
            sizes = {s: int(meta[f"{s}_tokens"]) * np.dtype(meta["dtype"]).itemsize for s in ("train", "val")}
            int(meta["vocab_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path / META}: not the meta of token shards ({e!r}); prepare the data again") from None
        arrays = {}
        for split in ("train", "val"):
            f = path / f"{split}.bin"
            n = meta[f"{split}_tokens"]
            expected = sizes[split]
            if not f.is_file() or f.stat().st_size != expected:
                raise UserError(f"{f}: missing or truncated (expected {expected} bytes); prepare the data again")
            arrays[split] = np.memmap(f, dtype=meta["dtype"], mode="r") if n else np.zeros(0, meta["dtype"])
        return cls(path, meta, arrays["train"], arrays["val"])

    def split(self, name: str) -> np.ndarray:
        return self.train if name == "train" else self.val

    def check(self, seq_len: int, vocab_size: int) -> None:
        for name in ("train", "val"):
            n = len(self.split(name))
            if name == "val" and n == 0:
                continue
            if n < seq_len + 1:
                raise UserError(
                    f"{self.path}: the {name} split has {n} tokens, fewer than train.seq_len + 1 = {seq_len + 1}"
                )
        if self.meta["vocab_size"] > vocab_size:
            raise UserError(
                f"{self.path}: tokens go up to a vocabulary of {self.meta['vocab_size']}, "
                f"but the model's vocab_size is {vocab_size}"
            )

    def batch(self, split: str, key: Sequence[int], batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each (batch_size, seq_len) int64: random windows, targets shifted by one.

        `key` (e.g. (seed, step, micro, rank)) seeds the draw: the same key always gives the same batch.
        """
        data = self.split(split)
        starts = np.random.default_rng(list(key)).integers(0, len(data) - seq_len, size=batch_size)
        rows = np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        return rows[:, :-1], rows[:, 1:]


def unigram_entropy(shards: TokenShards, split: str = "val") -> float:
    """Entropy in nats of the unigram token distribution of a split: the loss of the best context-free model."""
    data = np.asarray(shards.split(split))
    counts = np.bincount(data, minlength=shards.meta["vocab_size"]).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
