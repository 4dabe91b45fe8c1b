"""The formats datasets ship in (JSONL, JSON, gzip, Parquet file and shards, a datasets save_to_disk folder, CSV),
column maps, ShareGPT and whole-conversation pairs: each read the same as its JSONL equivalent, through the
readers and through a few steps of sft, dpo and pretrain; bad records named by file and row."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from llmstages.cli import main
from llmstages.config import SFTConfig, load_config
from llmstages.data.chat import read_conversations
from llmstages.data.preference import read_preferences, read_prompts
from llmstages.data.records import read_records
from llmstages.data.text import iter_documents
from llmstages.errors import UserError
from llmstages.stages import sft
from llmstages.store import load_tokenizer
from tests.helpers import builtin_base

SFT_ROWS = [{"question": f"Where does person {i} live?", "answer": f"In town {i}."} for i in range(12)]
PAIR_ROWS = [{"q": f"Pet of person {i}?", "good": f"a cat {i}", "bad": f"a dog {i}, maybe"} for i in range(12)]


def write(folder, name: str, rows: list[dict]):
    """`rows` as the format `name` ends in; returns the path (a folder for shards and save_to_disk)."""
    path = folder / name
    table = pa.Table.from_pylist(rows)
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows, indent=1))
    elif name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".parquet"):
        pq.write_table(table, path, row_group_size=5)  # several row groups, read batch by batch
    elif name == "shards":
        path.mkdir()
        pq.write_table(table.slice(0, 7), path / "train-00000-of-00002.parquet")
        pq.write_table(table.slice(7), path / "train-00001-of-00002.parquet")
    elif name == "saved":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path), max_shard_size="1KB")
    elif name.endswith(".csv"):
        pcsv.write_csv(table, path)
    return path


FORMATS = ["rows.json", "rows.jsonl.gz", "rows.parquet", "shards", "saved", "rows.csv"]


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_reads_as_its_jsonl(tmp_path, name):
    columns = {"prompt": "question", "completion": "answer"}
    want = read_conversations([write(tmp_path, "rows.jsonl", SFT_ROWS)], columns)
    got = read_conversations([write(tmp_path, name, SFT_ROWS)], columns)
    assert [m for _, m in got] == [m for _, m in want]
    assert got[0][1] == [{"role": "user", "content": "Where does person 0 live?"},
                         {"role": "assistant", "content": "In town 0."}]  # fmt: skip
    (tmp_path / "pairs").mkdir()
    pairs = read_preferences([write(tmp_path / "pairs", name, PAIR_ROWS)],
                             {"prompt": "q", "chosen": "good", "rejected": "bad"})  # fmt: skip
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs][:2] == [
        (({"role": "user", "content": f"Pet of person {i}?"},), f"a cat {i}", f"a dog {i}, maybe") for i in range(2)
    ]
    assert len(pairs) == 12 and len(read_prompts([tmp_path / name], {"prompt": "question"})) == 12
    docs = list(iter_documents([tmp_path / name], {"text": "answer"}))
    assert docs == [r["answer"] for r in SFT_ROWS]


def test_rows_are_named_in_messages(tmp_path):
    rows = [*SFT_ROWS[:4], {"question": "Who?", "answer": ""}]  # row 5: an empty reply
    for name, where in (("rows.parquet", ":5:"), ("rows.csv", ":6:"), ("saved", ":5:")):  # CSV: its line
        with pytest.raises(UserError, match=rf"{where} message 2 is an empty assistant reply"):
            read_conversations([write(tmp_path, name, rows)], {"prompt": "question", "completion": "answer"})
    with pytest.raises(UserError, match=r"rows.parquet:1: no column 'reply' \(data.columns maps completion to it"):
        read_conversations([tmp_path / "rows.parquet"], {"prompt": "question", "completion": "reply"})
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write(json.dumps(SFT_ROWS[0]) + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl.gz:2: not valid JSON"):
        read_conversations([bad], {"prompt": "question", "completion": "answer"})
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(UserError, match=r"fake.parquet: not a Parquet file"):
        read_conversations([tmp_path / "fake.parquet"])
    with pytest.raises(UserError, match=r"rows.parquet:1: unknown record format \(keys: question, answer\)"):
        read_conversations([tmp_path / "rows.parquet"])


def test_sharegpt_and_whole_conversation_pairs(tmp_path):
    share = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello."}, {"from": "user", "value": "Bye"},
                               {"from": "chatgpt", "value": "Goodbye."}]}  # fmt: skip
    path = write(tmp_path, "share.jsonl", [share])
    assert read_conversations([path])[0][1] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]  # fmt: skip
    assert read_prompts([path])[0][1][-1] == {"role": "user", "content": "Bye"}
    user = {"role": "user", "content": "Where does Ada live?"}
    ultra = {"chosen": [user, {"role": "assistant", "content": "Oakfield."}],
             "rejected": [user, {"role": "assistant", "content": "Oakfield or Ashford."}]}  # fmt: skip
    shared = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Pet?"}]
    sharegpt_pair = {"chosen": [*shared, {"from": "gpt", "value": "A cat."}],
                     "rejected": [*shared, {"from": "gpt", "value": "No idea."}]}  # fmt: skip
    a, b = read_preferences([write(tmp_path, "pairs.parquet", [ultra, sharegpt_pair])])
    assert (a.prompt, a.chosen, a.rejected) == ((user,), "Oakfield.", "Oakfield or Ashford.")
    assert b.prompt == ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": "Pet?"})  # fmt: skip
    assert (b.chosen, b.rejected) == ("A cat.", "No idea.")
    two_replies = {"chosen": [user, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                   "rejected": [user, {"role": "assistant", "content": "c"}]}  # fmt: skip
    with pytest.raises(UserError, match=r"bad.jsonl:1: after the 1 shared turns, 'chosen' must hold one assistant"):
        read_preferences([write(tmp_path, "bad.jsonl", [two_replies])])
    with pytest.raises(UserError, match=r"odd.jsonl:1: message 1 is from 'robot'"):
        read_conversations([write(tmp_path, "odd.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}])])


def test_a_save_to_disk_folder_inside_a_data_folder_gives_only_its_shards(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder, "saved", SFT_ROWS)  # its state.json and dataset_info.json are not records
    write(folder, "more.jsonl", SFT_ROWS[:2])
    assert len(read_conversations([folder], {"prompt": "question", "completion": "answer"})) == 14


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return builtin_base(tmp_path_factory.mktemp("records") / "base")


@pytest.mark.parametrize("name", FORMATS)
def test_stages_train_on_each_format_as_on_jsonl(base, tmp_path, name):
    """SFT's tokenized examples, DPO's tokenized pairs and pre-training's documents are the JSONL run's; sft, dpo
    and pretrain each run two steps from the format, through its column map."""
    from llmstages.data.preference import tokenize_pair

    tok = load_tokenizer(base)
    sft_cols = {"prompt": "question", "completion": "answer"}
    pair_cols = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    (tmp_path / "j").mkdir(), (tmp_path / "f").mkdir()
    paths = {}
    for kind, rows in (("sft", SFT_ROWS), ("pairs", PAIR_ROWS), ("docs", DOCS)):
        (tmp_path / "j" / kind).mkdir(), (tmp_path / "f" / kind).mkdir()
        paths[kind] = (write(tmp_path / "j" / kind, "rows.jsonl", rows), write(tmp_path / "f" / kind, name, rows))
    examples = [_sft_examples(base, p, tok) for p in paths["sft"]]
    assert [(e.input_ids, e.labels) for e in examples[0]] == [(e.input_ids, e.labels) for e in examples[1]]
    pairs = [[tokenize_pair(x, tok, i, 48) for i, x in enumerate(read_preferences([p], pair_cols))]
             for p in paths["pairs"]]  # fmt: skip
    tokens = [
        [(x.chosen.input_ids, x.chosen.labels, x.rejected.input_ids, x.rejected.labels) for x in p] for p in pairs
    ]
    assert tokens[0] == tokens[1] and len(tokens[0]) == len(PAIR_ROWS)
    docs = [list(iter_documents([p], {"text": "body"})) for p in paths["docs"]]
    assert docs[0] == docs[1] and len(docs[0]) == len(DOCS)
    steps = ["train.max_steps=2", "train.batch_size=4", "train.eval_every=100", "train.save_every=100",
             "train.precision=fp32", "train.warmup_steps=0"]  # fmt: skip
    fmt = lambda cols: "data.columns={" + ", ".join(f"{k}: {v}" for k, v in cols.items()) + "}"  # noqa: E731
    sft_path, pair_path, doc_path = paths["sft"][1], paths["pairs"][1], paths["docs"][1]
    assert main(["sft", f"model.path={base}", f"data.path={sft_path}", fmt(sft_cols), f"out_dir={tmp_path / 'sft'}",
                 *steps, "train.seq_len=48"]) == 0  # fmt: skip
    assert main(["dpo", f"model.path={base}", f"data.path={pair_path}", fmt(pair_cols), f"out_dir={tmp_path / 'dpo'}",
                 *steps, "train.seq_len=48"]) == 0  # fmt: skip
    assert main(["pretrain", f"data.path={doc_path}", "data.columns={text: body}", f"out_dir={tmp_path / 'pre'}",
                 "data.vocab_size=300", "data.workers=1", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
                 "model.n_kv_heads=1", "model.block_size=32", "train.seq_len=32", *steps]) == 0  # fmt: skip


DOCS = [{"body": f"Person {i} lives in town {i}. " * 8} for i in range(40)]


def _sft_examples(base, path, tok):
    cfg = load_config(SFTConfig, None, [f"model.path={base}", f"data.path={path}",
                                        "data.columns={prompt: question, completion: answer}"])  # fmt: skip
    return sft._examples(cfg, tok)[0]


# -- damaged files: one clear error naming the file and, where known, the line or row ----------------------------


def _corrupt_parquet(path):
    """A real Parquet file whose second row group's data page is overwritten with garbage."""
    rows = [{"text": f"document number {i} " * 20} for i in range(3000)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000, compression="snappy", use_dictionary=False)
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2  # past the page header, in the values
    data = bytearray(path.read_bytes())
    data[middle : middle + 200] = b"\xff" * 200
    path.write_bytes(bytes(data))
    return path


def _bad_utf8_parquet(path):
    """A Parquet string column whose second value is not UTF-8 (written from raw buffers, as a broken writer would)."""
    raw = pa.array([b"fine", b"bad \xff\xfe here", b"fine too"], type=pa.binary())
    pq.write_table(pa.table({"text": pa.Array.from_buffers(pa.string(), 3, raw.buffers())}), path)
    return path


def _ragged_csv(path):
    """A CSV whose only bad row (three fields under a two-column header) lies past the first megabyte."""
    lines = ["text,label", *(f"row number {i} of the corpus,{i}" for i in range(40000)), "a,b,c", "x,1"]
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > 1 << 20
    return path, len(lines) - 1  # the line of "a,b,c"


def _truncated_gz(path):
    data = gzip.compress(b"text\n" + b"".join(b"line %d of a long file\n" % i for i in range(5000)))
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_arrow_folder(path):
    """A datasets save_to_disk folder (state.json, dataset_info.json, an Arrow stream shard), its shard cut short."""
    path.mkdir()
    table = pa.Table.from_pylist([{"text": f"document {i} " * 30} for i in range(2000)])
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table, max_chunksize=500)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (path / "dataset_info.json").write_text("{}")
    shard = path / "data-00000-of-00001.arrow"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return path


def test_damaged_files_name_the_file_and_where(tmp_path):
    cases = [
        (_corrupt_parquet(tmp_path / "corrupt.parquet"), r"corrupt.parquet: damaged or truncated: .*\(Corrupt snappy"),
        (_bad_utf8_parquet(tmp_path / "utf8.parquet"), r"utf8.parquet:2: column 'text' is not UTF-8 text$"),
        (_truncated_gz(tmp_path / "cut.csv.gz"), r"cut.csv.gz: cannot be read as .csv.gz after line \d+ \(Compressed"),
        (_truncated_arrow_folder(tmp_path / "saved"), r"data-00000-of-00001.arrow: damaged or truncated: rows after "
                                                      r"1000 cannot be read \(Expected to be able to read"),
    ]  # fmt: skip
    ragged, line = _ragged_csv(tmp_path / "ragged.csv")
    cases.append((ragged, rf"ragged.csv:{line}: 3 fields where the header has 2 \(text, label\)$"))
    (tmp_path / "quote.csv").write_text('text\nfirst document\n"second document, its quote left open\nthird\n')
    cases.append((tmp_path / "quote.csv", r"quote.csv:3: a quoted field opens here and is never closed$"))
    (tmp_path / "latin1.csv").write_bytes(b"text\n" + b"caf\xe9\n" * 3 + b"ok\n" * 5000)
    cases.append((tmp_path / "latin1.csv", r"latin1.csv:2: not UTF-8 text"))
    (tmp_path / "late_nul.txt").write_bytes(b"plain text line\n" * 1000 + b"\x00\x01\x02binary tail")
    cases.append((tmp_path / "late_nul.txt", r"late_nul.txt:1001: not a text file \(it contains NUL bytes"))
    for path, message in cases:
        with pytest.raises(UserError, match=message) as e:
            list(iter_documents([path]))
        assert "\n" not in str(e.value)


def test_csv_cells_are_text_and_quoted_newlines_are_one_cell(tmp_path):
    path = tmp_path / "digits.csv"
    path.write_text('text,n\n123,1\n"two\nlines, one cell",2\n\n0042,3\n')  # a blank line is skipped
    assert list(read_records(path)) == [
        (f"{path}:2", {"text": "123", "n": "1"}),
        (f"{path}:3", {"text": "two\nlines, one cell", "n": "2"}),
        (f"{path}:6", {"text": "0042", "n": "3"}),
    ]
    assert list(iter_documents([path])) == ["123", "two\nlines, one cell", "0042"]
