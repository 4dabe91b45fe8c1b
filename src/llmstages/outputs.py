"""What a command may write to: a new or empty folder, or a folder it made itself; never anything else.

    claim_run_dir(out, "sft", resume, overwrite)   # a stage's run folder (checked in setup, nothing written)
    claim_folder(out, "tokenizer", is_tokenizer_dir, replace=True)
    replace_dir(tmp, out)                          # a finished temporary folder takes the place of `out`

A training run's folder carries `run.json` ({"stage": ..., "base": the model it started from, with the sha256 of
its weights}); one written before that mark existed is recognised by its `config.yaml` and `metrics.jsonl`. While a
run writes, its folder holds `run.lock` (the process and host): a second run into the folder is refused until that
process has ended; a lock left by a killed process is taken over. Folders are written under a temporary name beside
their place and moved in with one rename (an exchange of the two names on Linux), so a crash leaves the old folder
or the new one.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from llmstages.errors import UserError

RUN_MARK = "run.json"
RUN_LOCK = "run.lock"
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


def _run_mark(path: Path) -> dict:
    """The run folder's `run.json` ({} when it is missing or does not read as a JSON object)."""
    try:
        mark = json.loads((path / RUN_MARK).read_text())
    except (OSError, ValueError):
        return {}
    return mark if isinstance(mark, dict) else {}


def run_stage(path: Path) -> str | None:
    """The stage that made the run folder `path` (None for a folder from before the mark)."""
    return _run_mark(path).get("stage")


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def refuse_through_file(path: Path, what: str) -> None:
    """Refuse an output path that runs through an existing file (FILE/sub): no folder can be made there."""
    for parent in path.parents:  # the nearest that exists must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path}: {parent} is a file, not a folder (nothing was written)")
            return


def _refuse_file(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder; choose a folder name")
    refuse_through_file(path, what)


def claim_run_dir(out: Path, stage: str, resume: bool, overwrite: bool, what: str = "out_dir") -> None:
    """Check that a stage may write its run into `out` (writes nothing): a new or empty folder, or this stage's own
    run folder continued (resume=true) or started again (overwrite=true)."""
    _refuse_file(out, what)
    if not out.exists() or not any(p.name != RUN_LOCK for p in out.iterdir()):  # new, empty, or a lock only
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


def start_run_dir(out: Path, stage: str, overwrite: bool, base: dict | None = None) -> None:
    """Make the run folder and its mark (with `base`, the model the run starts from, when it has one); with
    overwrite=true first clear what an earlier run of it created."""
    if overwrite and out.is_dir() and is_run_dir(out):
        for name in RUN_ENTRIES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    mark = {"stage": stage, **({"base": base} if base else {})}
    (out / RUN_MARK).write_text(json.dumps(mark) + "\n")


def run_base(path: Path) -> dict | None:
    """The model the run in `path` started from, as its `run.json` records it ({"path", "sha256"}), or None."""
    base = _run_mark(path).get("base")
    return base if isinstance(base, dict) and isinstance(base.get("sha256"), str) else None


# ----------------------------------------------------------------------------------------------------------------
# The run lock: one process writes a run folder at a time


_HELD: set[Path] = set()  # the locks this process holds


def _started(pid: int) -> str | None:
    """When process `pid` started (Linux: field 22 of /proc/PID/stat), which tells a reused pid apart; None
    where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else None


def _holder(lock: Path) -> dict | None:
    """Who holds `lock` ({"pid", "host", "started"}), None when there is no lock; {} for one that does not read
    (a lock is written whole before it takes its name, so an unreadable one is nobody's)."""
    try:
        holder = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_mine(holder: dict) -> bool:
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _is_alive(holder: dict) -> bool:
    """Whether the process that wrote the lock still runs: on this host, its pid exists and started when the lock
    says; on another host there is no telling, so it counts as running."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    started = holder.get("started")
    return started is None or _started(pid) in (None, started)


def _refuse_held(out: Path, holder: dict) -> None:
    lock = out / RUN_LOCK
    if holder.get("host") != socket.gethostname():
        raise UserError(
            f"{out} is being written by process {holder.get('pid')} on host {holder.get('host')} ({lock}); wait "
            f"for that run to end, or delete {lock} if it has (nothing was written)"
        )
    raise UserError(
        f"{out} is being written by a run that is still going (process {holder.get('pid')}, {lock}); wait for it "
        "to end or stop it first (nothing was written)"
    )


def check_run_lock(out: Path) -> None:
    """Refuse a run folder that another running process writes (checked in setup: writes nothing)."""
    holder = _holder(out / RUN_LOCK)
    if holder and not _is_mine(holder) and _is_alive(holder):
        _refuse_held(out, holder)


def claim_run_lock(out: Path) -> None:
    """Take `out/run.lock` for this process (making `out`), taking over a lock whose process has ended; released
    by `release_run_lock` or when the process exits. An error when a running process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / RUN_LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _started(os.getpid())}
    for _ in range(3):
        holder = _holder(lock)
        if holder is not None:
            if _is_mine(holder):
                break
            if _is_alive(holder):
                _refuse_held(out, holder)
            with contextlib.suppress(FileNotFoundError):  # a stale lock: its process has ended
                lock.unlink()
        tmp = out / f".{RUN_LOCK}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(me) + "\n")
        try:
            os.link(tmp, lock)  # the lock appears whole, and only if nobody took it meanwhile
        except FileExistsError:
            continue
        finally:
            tmp.unlink(missing_ok=True)
        break
    else:
        raise UserError(f"{out}: another run keeps taking {lock}; try again (nothing was written)")
    if not _HELD:
        atexit.unregister(_release_all)  # registered once, however often the locks come and go
        atexit.register(_release_all)
    _HELD.add(lock)


def release_run_lock(out: Path) -> None:
    """Give back the lock of `out` when this process holds it."""
    lock = out / RUN_LOCK
    holder = _holder(lock)
    if holder and _is_mine(holder):
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
    _HELD.discard(lock)


def _release_all() -> None:
    for lock in list(_HELD):
        with contextlib.suppress(OSError):
            release_run_lock(lock.parent)


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
    refuse_through_file(path, what)
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


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(e: BaseException) -> bool:
    """An error from a full disk (or quota): an OSError with ENOSPC/EDQUOT, or the text of one that the Rust
    writers (safetensors, tokenizers) raise as their own exception types."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in DISK_FULL
    text = str(e)
    return any(s in text for s in ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded"))


@contextlib.contextmanager
def disk_full_is_an_error(path: str | Path, what: str) -> Iterator[None]:
    """Turn running out of disk space while writing `path` (a folder or file written whole, under a temporary name)
    into one line saying so; the writer has removed its temporary copy, so an earlier `what` there is kept."""
    existed = Path(path).exists()
    try:
        yield
    except Exception as e:
        if isinstance(e, UserError) or not is_disk_full(e):
            raise
        kept = f"the earlier {what} there is kept" if existed else "nothing was written there"
        raise UserError(f"no space left on device: {path} ({kept})") from None
