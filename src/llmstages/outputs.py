"""What a command may write to: a new or empty folder, or a folder it made itself; never anything else.

    claim_run_dir(out, "sft", resume, overwrite)   # a stage's run folder (checked in setup, nothing written)
    claim_folder(out, "tokenizer", is_tokenizer_dir, replace=True)
    replace_dir(tmp, out)                          # a finished temporary folder takes the place of `out`

A training run's folder carries `run.json` ({"stage": ...}); one written before that mark existed is recognised by
its `config.yaml` and `metrics.jsonl`. Folders are written under a temporary name beside their place and moved in
with one rename (an exchange of the two names on Linux), so a crash leaves the old folder or the new one.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from llmstages.errors import UserError

RUN_MARK = "run.json"
# What a run creates in its folder, and what overwrite=true clears (anything else there is left alone).
RUN_ENTRIES = (
    "checkpoints",
    "final",
    "metrics.jsonl",
    "tb",
    "profile",
    "wandb",
    "mlruns",
    "config.yaml",
    RUN_MARK,
    "data",
    "tokenizer",
    "plots",
    "report.html",
)


def is_run_dir(path: Path) -> bool:
    return (path / RUN_MARK).is_file() or ((path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file())


def run_stage(path: Path) -> str | None:
    """The stage that made the run folder `path` (None for a folder from before the mark)."""
    try:
        return json.loads((path / RUN_MARK).read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return None


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not is_run_dir(path)


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _refuse_file(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder; choose a folder name")


def claim_run_dir(out: Path, stage: str, resume: bool, overwrite: bool, what: str = "out_dir") -> None:
    """Check that a stage may write its run into `out` (writes nothing): a new or empty folder, or this stage's own
    run folder continued (resume=true) or started again (overwrite=true)."""
    _refuse_file(out, what)
    if not out.exists() or is_empty_dir(out):
        return
    if not is_run_dir(out):
        names = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise UserError(
            f"{what} {out} holds files that no llmstages run wrote ({names}, ...); choose a new or "
            "empty folder (nothing was written)"
        )
    made_by = run_stage(out)
    if made_by is not None and made_by != stage:
        raise UserError(f"{what} {out} is a {made_by} run; choose another folder for this {stage} run")
    if not resume and not overwrite and not (out / "checkpoints").is_dir():
        raise UserError(
            f"{what} {out} holds an earlier {stage} run; pass resume=true to continue it or "
            "overwrite=true to start it again"
        )


def start_run_dir(out: Path, stage: str, overwrite: bool) -> None:
    """Make the run folder and its mark; with overwrite=true first clear what an earlier run of it created."""
    if overwrite and out.is_dir() and is_run_dir(out):
        for name in RUN_ENTRIES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARK).write_text(json.dumps({"stage": stage}) + "\n")


def claim_folder(out: Path, what: str, is_own: Callable[[Path], bool], replace: bool = True) -> None:
    """Check that a command may write the folder `out`: new, empty, or (with `replace`) one it wrote before, as
    `is_own` tells; never a training run or a folder of someone else's files."""
    _refuse_file(out, what)
    if not out.exists() or is_empty_dir(out):
        return
    if is_run_dir(out) or (out / "checkpoints").is_dir():
        raise UserError(f"{what} {out} is a training run; write elsewhere (nothing was written)")
    if not is_own(out):
        raise UserError(
            f"{what} {out} is not empty and holds no earlier output of this command; choose a new or "
            "empty folder (nothing was written)"
        )
    if not replace:
        raise UserError(f"{what} {out} already exists; pass --force to replace it")


def temp_dir_beside(path: Path) -> Path:
    """A new temporary folder next to `path` (same file system, so it can be renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(tmp: Path, path: Path) -> None:
    """Put the finished folder `tmp` in the place of `path`: at no moment is `path` a mix of the two."""
    if not path.exists():
        tmp.rename(path)
        return
    if _exchange(tmp, path):  # `tmp` now holds the old folder
        shutil.rmtree(tmp)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old)


def write_dir(path: Path, fill: Callable[[Path], None]) -> Path:
    """Write a folder whole: `fill(tmp)` writes into a temporary folder beside `path`, which then replaces it."""
    tmp = temp_dir_beside(path)
    try:
        fill(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def claim_file(path: Path, what: str, is_own: Callable[[Path], bool]) -> None:
    """Check that a command may write the file `path`: new, or one it wrote before (`is_own`); never a folder."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not is_own(path):
        raise UserError(f"{what} {path} exists and is not an earlier output of this command; choose a new file name")


def write_file(path: Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
