"""Records from the formats datasets ship in, for pre-training, SFT, preference and prompt data alike.

- JSONL / JSON (an array, or one object a line), also gzip-compressed (`.jsonl.gz`, `.json.gz`);
- Parquet: a `.parquet` file, or a folder of shards;
- Arrow: a `datasets.save_to_disk` folder (its `state.json` names the shards), or `.arrow` files (IPC file or
  stream format);
- CSV (`.csv`, `.csv.gz`), a header row naming the columns; every cell is text (a column of digits too).

Parquet and Arrow are read with pyarrow one record batch at a time, CSV and JSONL a row or line at a time, so a
corpus larger than memory streams through tokenization. Every record comes with where it is, `file:line` for JSONL
and CSV (the line a record starts on) and `file:row` (1-based) for Parquet and Arrow, for the messages about it.
A damaged file (a corrupt page, bytes that are not UTF-8, a ragged or unclosed CSV row, a truncated gzip or Arrow
shard) is an error naming the file and, where known, the line or row. `data.columns` renames a file's columns to
the names a format needs (`{prompt: question, completion: answer}`) before the record is read.
"""

from __future__ import annotations

import csv
import errno
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from llmstages.errors import UserError

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
COLUMNAR_SUFFIXES = (".parquet", ".arrow", ".csv", ".csv.gz")
RECORD_SUFFIXES = JSON_SUFFIXES + COLUMNAR_SUFFIXES
BATCH_ROWS = 1024


def suffix(path: Path) -> str:
    """The format suffix, compression included (".jsonl.gz"), lower case."""
    name = path.name.lower()
    for s in sorted(RECORD_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def is_records(path: Path) -> bool:
    return suffix(path) in RECORD_SUFFIXES


def why_missing(path: Path) -> str:
    """Why `path` cannot be opened, for a message: "does not exist", or that it is a symlink loop or a link to
    nothing (both of which `Path.exists()` reports as not existing)."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop (a link that leads back to itself)"
        if path.is_symlink():
            return f"is a symlink to '{os.readlink(path)}', which does not exist"
    return "does not exist"


def dataset_folder(path: Path) -> list[Path] | None:
    """The Arrow shards of a `datasets.save_to_disk` folder in their order, or None when `path` is not one."""
    state = path / "state.json"
    if not (path.is_dir() and state.is_file() and (path / "dataset_info.json").is_file()):
        return None
    try:
        files = [path / f["filename"] for f in json.loads(read_text(state))["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{state}: not a datasets save_to_disk state (no '_data_files' list)") from None
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{path}: the dataset's shard {missing[0].name} is missing")
    return files


def read_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for every record of one file of any supported format; a bad line or file is an error
    naming it."""
    kind = suffix(path)
    if kind in (".jsonl.gz", ".json.gz"):
        yield from _read_json_lines(path, gzip.open(path, "rt", encoding="utf-8-sig"))
    elif kind in (".jsonl", ".json"):
        yield from _read_json(path)
    elif kind == ".parquet":
        yield from _read_parquet(path)
    elif kind == ".arrow":
        yield from _read_arrow(path)
    elif kind in (".csv", ".csv.gz"):
        yield from _read_csv(path)
    else:
        raise UserError(f"{path}: not a record file (formats: {', '.join(RECORD_SUFFIXES)})")


def mapped(record: object, columns: Mapping[str, str], where: str) -> object:
    """`record` with its columns renamed by `columns` (format name -> the file's name); a missing column is an
    error listing the record's columns."""
    if not columns:
        return record
    if not isinstance(record, dict):
        raise UserError(f"{where}: data.columns needs records with named fields, got {type(record).__name__}")
    missing = [(k, v) for k, v in columns.items() if v not in record]
    if missing:
        k, v = missing[0]
        raise UserError(f"{where}: no column '{v}' (data.columns maps {k} to it; columns: {', '.join(record)})")
    renamed = set(columns.values())
    return {**{k: v for k, v in record.items() if k not in renamed}, **{k: record[v] for k, v in columns.items()}}


def iter_records(files: Sequence[Path], columns: Mapping[str, str] | None = None) -> Iterator[tuple[str, object]]:
    """(where, record) over several files, `columns` applied."""
    for f in files:
        for where, record in read_records(f):
            yield where, mapped(record, columns or {}, where)


# ----------------------------------------------------------------------------------------------------------------
# The formats


def _one_line(e: BaseException) -> str:
    """An exception's text on one line (pyarrow's quote whole rows, newlines included)."""
    return " ".join(str(e).split()) or type(e).__name__


def read_text(path: Path) -> str:
    """A whole text file; a binary or non-UTF-8 one is an error naming the file and the line."""
    data = path.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:  # anywhere in the file, not only near its start
        line = data[:nul].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not a text file (it contains NUL bytes; a binary file?)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (a binary file?)") from None


def _json_kind(value: object) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a number")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold one object (a config): not UTF-8, invalid JSON, or another value (null, an
    array) is an error naming the file."""
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object ({{...}}), got {_json_kind(value)}")
    return value


def _bad_utf8_line(path: Path, opener: Callable[..., IO[bytes]]) -> int | None:
    """The first line of a file (through `opener`, e.g. gzip.open) that is not UTF-8; read again only when decoding
    failed, since a text reader decodes ahead of the line it returns."""
    try:
        with opener(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return n
    except (OSError, EOFError, zlib.error):
        pass
    return None


def _read_json(path: Path) -> Iterator[tuple[str, object]]:
    with path.open("rb") as f:
        head = f.read(8192)
    if b"\x00" in head:
        raise UserError(f"{path}: not a text file (it contains NUL bytes; a binary file?)")
    if path.suffix.lower() == ".json" and head.lstrip().startswith(b"["):
        try:
            records = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        yield from ((f"{path}:{i + 1}", r) for i, r in enumerate(records))  # item numbers stand in for lines
        return
    yield from _read_json_lines(path, path.open(encoding="utf-8-sig"))


def _opener(path: Path) -> Callable[..., IO[Any]]:
    return gzip.open if path.name.lower().endswith(".gz") else open


def _read_json_lines(path: Path, handle) -> Iterator[tuple[str, object]]:
    with handle as f:
        n = 0
        try:
            for n, line in enumerate(f, 1):  # noqa: B007 (n names the line of a decoding error below)
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError:
            line = _bad_utf8_line(path, _opener(path)) or n + 1
            raise UserError(f"{path}:{line}: not UTF-8 text (a binary file?)") from None
        except (OSError, EOFError, zlib.error) as e:  # gzip: not a gzip file, damaged, or cut short
            raise UserError(f"{path}: cannot be read as {suffix(path)} after line {n} ({_one_line(e)})") from None


def _batches(path: Path, batches: Iterator[Any]) -> Iterator[tuple[str, object]]:
    """(where, record) of every row of pyarrow record batches; a batch that cannot be read (a corrupt page, a
    truncated shard) or text that is not UTF-8 is an error naming the file and the row."""
    row = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # pyarrow: OSError, ArrowInvalid (a ValueError) and kin
            where = f"rows after {row} cannot be read" if row else "cannot be read"
            raise UserError(f"{path}: damaged or truncated: {where} ({_one_line(e)})") from None
        try:
            records = batch.to_pylist()
        except UnicodeDecodeError:
            at, column = _bad_utf8_cell(batch)
            raise UserError(f"{path}:{row + at}: column '{column}' is not UTF-8 text") from None
        for record in records:
            row += 1
            yield f"{path}:{row}", record


def _bad_utf8_cell(batch: Any) -> tuple[int, str]:
    """(1-based row within the batch, column) of the first cell whose text is not UTF-8."""
    for i in range(batch.num_rows):
        for name, column in zip(batch.schema.names, batch.columns):
            try:
                column[i].as_py()
            except UnicodeDecodeError:
                return i + 1, name
    return 1, batch.schema.names[0]  # pragma: no cover - to_pylist failed, so some cell fails


def _pyarrow(path: Path):
    try:
        import pyarrow
    except ImportError:  # pragma: no cover - a run-time dependency
        raise UserError(f"{path}: reading {suffix(path)} needs pyarrow (pip install pyarrow)") from None
    return pyarrow


def _read_parquet(path: Path) -> Iterator[tuple[str, object]]:
    _pyarrow(path)
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        batches = parquet.iter_batches(batch_size=BATCH_ROWS)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
        raise UserError(f"{path}: not a Parquet file ({_one_line(e)})") from None
    yield from _batches(path, batches)


def _read_arrow(path: Path) -> Iterator[tuple[str, object]]:
    pa = _pyarrow(path)
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except (pa.ArrowInvalid, OSError):
        try:
            batches = iter(pa.ipc.open_stream(pa.memory_map(str(path))))  # what datasets.save_to_disk writes
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"{path}: not an Arrow file, or truncated ({_one_line(e)})") from None
    yield from _batches(path, batches)


def _read_csv(path: Path) -> Iterator[tuple[str, object]]:
    """Records of a CSV file (gzipped too) with Python's csv module in strict mode: every cell a string, a row
    with more or fewer fields than the header, a quote left open to the end of the file, bytes that are not UTF-8
    and a truncated gzip are errors naming the line."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a document in one cell may be long
    opener = _opener(path)
    start = 0
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)
            header: list[str] | None = None
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    if "unexpected end of data" in str(e):
                        line = _unclosed_quote_line(path, opener, start)
                        raise UserError(f"{path}:{line}: a quoted field opens here and is never closed") from None
                    raise UserError(f"{path}:{reader.line_num}: not valid CSV ({_one_line(e)})") from None
                if not row:
                    continue  # a blank line
                if any("\x00" in cell for cell in row):
                    raise UserError(f"{path}:{start}: not a text file (it contains NUL bytes; a binary file?)")
                if header is None:
                    header = _csv_header(path, row)
                    continue
                if len(row) != len(header):
                    raise UserError(
                        f"{path}:{start}: {len(row)} fields where the header has {len(header)} ({', '.join(header)})"
                    )
                yield f"{path}:{start}", dict(zip(header, row))
            if header is None:
                raise UserError(f"{path}: not a CSV file with a header row (the file is empty)")
    except UnicodeDecodeError:
        line = _bad_utf8_line(path, opener) or start
        raise UserError(f"{path}:{line}: not UTF-8 text (a binary file?)") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip: not a gzip file, damaged, or cut short
        raise UserError(f"{path}: cannot be read as {suffix(path)} after line {start - 1} ({_one_line(e)})") from None


def _csv_header(path: Path, row: list[str]) -> list[str]:
    names = list(row)
    for i, name in enumerate(names):
        if not name.strip():
            raise UserError(f"{path}:1: column {i + 1} of the header has no name")
        if name in names[:i]:
            raise UserError(f"{path}:1: column '{name}' appears twice in the header")
    return names


_FIELD_END = re.compile(r"[,\n]")


def _unclosed_quote_line(path: Path, opener: Callable[..., IO[Any]], start: int) -> int:
    """The line of the quote that opens a field and never closes, in the CSV record starting on line `start` (which
    then runs to the end of the file); read again only on that error."""
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        for _ in range(start - 1):
            f.readline()
        text = f.read()
    i, opened = 0, 0
    while i < len(text):
        if text[i] == '"':  # a field that starts with a quote runs to the next lone quote
            opened, j = i, i + 1
            while True:
                j = text.find('"', j)
                if j < 0:
                    return start + text.count("\n", 0, opened)
                if text.startswith('"', j + 1):  # "" is a quote inside the field
                    j += 2
                    continue
                break
            i = j + 1
        m = _FIELD_END.search(text, i)
        if m is None:
            break
        i = m.end()
    return start + text.count("\n", 0, opened)
