"""Records from the formats datasets ship in, for pre-training, SFT, preference and prompt data alike.

- JSONL / JSON (an array, or one object a line), also gzip-compressed (`.jsonl.gz`, `.json.gz`);
- Parquet: a `.parquet` file, or a folder of shards;
- Arrow: a `datasets.save_to_disk` folder (its `state.json` names the shards), or `.arrow` files (IPC file or
  stream format);
- CSV (`.csv`, `.csv.gz`), a header row naming the columns.

Parquet, Arrow and CSV are read with pyarrow one record batch at a time, and JSONL a line at a time, so a corpus
larger than memory streams through tokenization. Every record comes with where it is, `file:line` for JSONL and
`file:row` (1-based) for the columnar formats, for the messages about it. `data.columns` renames a file's
columns to the names a format needs (`{prompt: question, completion: answer}`) before the record is read.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

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


def dataset_folder(path: Path) -> list[Path] | None:
    """The Arrow shards of a `datasets.save_to_disk` folder in their order, or None when `path` is not one."""
    state = path / "state.json"
    if not (path.is_dir() and state.is_file() and (path / "dataset_info.json").is_file()):
        return None
    try:
        files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
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
        yield from _read_json_lines(path, gzip.open(path, "rt", encoding="utf-8"))
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


def read_text(path: Path) -> str:
    """A whole text file; a binary or non-UTF-8 one is an error naming the file (and the line)."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise UserError(f"{path}: not a text file (it contains NUL bytes; a binary file?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (a binary file?)") from None


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
    yield from _read_json_lines(path, path.open(encoding="utf-8"))


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
            raise UserError(f"{path}:{n + 1}: not UTF-8 text (a binary file?)") from None
        except (OSError, EOFError) as e:  # gzip: not a gzip file, or cut short
            raise UserError(f"{path}: cannot be read as {suffix(path)} ({e})") from None


def _batches(path: Path, batches) -> Iterator[tuple[str, object]]:
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:{row}", record


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
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
        raise UserError(f"{path}: not a Parquet file ({e})") from None
    yield from _batches(path, parquet.iter_batches(batch_size=BATCH_ROWS))


def _read_arrow(path: Path) -> Iterator[tuple[str, object]]:
    pa = _pyarrow(path)
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        try:
            batches = iter(pa.ipc.open_stream(pa.memory_map(str(path))))  # what datasets.save_to_disk writes
        except pa.ArrowInvalid as e:
            raise UserError(f"{path}: not an Arrow file ({e})") from None
    yield from _batches(path, batches)


def _read_csv(path: Path) -> Iterator[tuple[str, object]]:
    pa = _pyarrow(path)
    import pyarrow.csv as pcsv

    try:
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 20))
    except pa.ArrowInvalid as e:
        raise UserError(f"{path}: not a CSV file with a header row ({e})") from None
    yield from _batches(path, reader)
