"""Training checkpoints: `checkpoints/step_N/` with the model (safetensors), the optimizer, the loop state and
every RNG state, written atomically so that a crash mid-write leaves the previous checkpoint as it was.

A checkpoint is complete when its folder is named `step_N`: it is written as `.step_N.tmp`, and `state.json`
(written last) plus the rename mark it done. Only files we wrote are ever unpickled, and then with
`weights_only=True`. A resume takes the newest checkpoint that reads whole and agrees with itself (its state names
step N, and every part the loop restores is there and loads); any other is skipped with one line saying why.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmstages.errors import UserError

STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
    }
    return state


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.integer):
        return int(x)
    return x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def torch_rng_state() -> dict[str, Any]:
    """torch's CPU generator and, where present, every CUDA device's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_torch_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state dict, shared storage (tied weights) saved once."""
    seen: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen and t.numel():
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


_DIGESTS: dict[tuple, str] = {}  # the files' identities (inode, size, change time) -> their digest


def weights_digest(folder: Path) -> str:
    """sha256 of a model directory's weights: every `*.safetensors` file (shards, an adapter) and
    `adapter_config.json`, in name order. What a run records of the model it starts from; computed once for each
    version of the files (a file written or replaced gets a new change time or inode)."""
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name == "adapter_config.json")
    )
    stats = [(p, p.stat()) for p in files]
    key = (
        str(folder.resolve()),
        *((p.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for p, st in stats),
    )
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for p, st in stats:
            h.update(f"{p.name}\0{st.st_size}\0".encode())
            with p.open("rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


_CHECKED: dict[Path, tuple[tuple, str | None]] = {}  # checkpoint folder -> (its files' stats, why it is unusable)
_TOLD: set[str] = set()  # the lines newest_loadable printed (each once)


def _signature(path: Path) -> tuple:
    """Names, sizes and modification times of a checkpoint's files: a checkpoint read once is read again only
    when one of them changed."""
    return tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()))


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (unreadable, incomplete, or a step that is not its
    folder's), or None when it reads whole; remembered until one of its files changes."""
    key, signature = path.resolve(), _signature(path)
    if key in _CHECKED and _CHECKED[key][0] == signature:
        return _CHECKED[key][1]
    try:
        read_checkpoint(path)
        problem = None
    except UserError as e:
        problem = str(e)
    _CHECKED[key] = (signature, problem)
    return problem


def newest_loadable(root: Path) -> Path | None:
    """The newest checkpoint under `root` that reads whole: a newest one that a crash left unreadable, or one
    edited into disagreeing with itself, is skipped for the one before it, with one line saying so. None when
    there is none; an error when none of them reads."""
    problems = []
    for path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path)
        if problem is not None:
            problems.append(problem)
            continue
        if problems:
            line = f"resume: {problems[-1]}; resuming from {path.name} instead"
            if line not in _TOLD:
                _TOLD.add(line)
                print(line, flush=True)
        return path
    if problems:
        raise UserError(f"no checkpoint in {root} can be read ({problems[0]})")
    return None


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep: int = 2,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `root/step_{step}` atomically and keep the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*.tmp"):  # left by an earlier crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".step_{step}.tmp"
    final = root / f"step_{step}"
    tmp.mkdir()
    try:
        tensors = model_state(model)
        for k, v in (extra_tensors or {}).items():
            tensors[f"extra.{k}"] = v.detach().contiguous().cpu()
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict() if optimizer is not None else None, "torch_rng": torch_rng_state()},
            tmp / "optimizer.pt",
        )
        full_state = {**state, "step": step, "rng": rng_state()}
        (tmp / "state.json").write_text(json.dumps(full_state) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_sharded(path: Path) -> bool:
    """True for a checkpoint written by torch.distributed.checkpoint (fsdp, tp, pp runs)."""
    return (path / "dcp").is_dir()


def save_sharded(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    extra_tensors: dict[str, torch.Tensor] | None,
    d: Any,
) -> Path:
    """Every rank writes its shards of the model and optimizer (torch.distributed.checkpoint, fully-qualified
    parameter names, so the checkpoint loads on any world size); rank 0 writes the loop state. Atomic like
    `save_checkpoint`: the folder gets its final name only once every rank is done."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp, final = root / f".step_{step}.tmp", root / f"step_{step}"
    if d.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    d.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    torch.save(torch_rng_state(), tmp / f"rng_rank{d.rank}.pt")
    if extra_tensors:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()},
            str(tmp / f"extra_rank{d.rank}.safetensors"),
        )
    d.barrier()
    if d.is_main:
        full_state = {**state, "step": step, "rng": rng_state(), "strategy": d.strategy}
        (tmp / "state.json").write_text(json.dumps(full_state) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def load_sharded(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, d: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore a sharded checkpoint into this run's model and optimizer, whatever their sharding (a 2-rank
    fsdp checkpoint resumes on one process, or on 4); returns (loop state, this rank's extra tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    try:
        state = json.loads((path / "state.json").read_text())
        msd, osd = get_state_dict(model, optimizer) if optimizer is not None else (model.state_dict(), {})
        if optimizer is not None:
            _tied_state_names(model, osd, dcp.FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata)
        dcp.load(
            {"model": msd, "optim": osd} if optimizer is not None else {"model": msd}, checkpoint_id=str(path / "dcp")
        )
    except Exception as e:  # noqa: BLE001 - a checkpoint that does not load is unusable
        raise UserError(f"{path}: cannot resume from this sharded checkpoint ({type(e).__name__}: {e})") from None
    if optimizer is not None:
        # dcp.load above already failed on any tensor missing from the checkpoint; strict=False only lets a tied
        # weight (one parameter, two names) take its state from either name.
        set_state_dict(
            model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=StateDictOptions(strict=False)
        )
    else:
        model.load_state_dict(msd)
    rng_file = path / f"rng_rank{d.rank}.pt"
    rng = torch.load(rng_file if rng_file.is_file() else path / "rng_rank0.pt", weights_only=True)
    set_torch_rng_state(rng)
    set_rng_state(state["rng"])
    extra_file = path / f"extra_rank{d.rank}.safetensors"
    extra = load_file(str(extra_file)) if extra_file.is_file() else {}
    return state, extra


def _tied_state_names(model: nn.Module, osd: dict[str, Any], saved: dict[str, Any]) -> None:
    """A tied weight (embedding = LM head) has one optimizer state under two names; a checkpoint holds it under
    the name(s) its run used (pp: both, one per stage). Ask for exactly the names the checkpoint has."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for group in (g for g in names.values() if len(g) > 1):
        have = [n for n in group if n in osd.get("state", {})]
        if not have:
            continue
        state = osd["state"][have[0]]
        for n in group:
            osd["state"].pop(n, None)
        for n in group:
            if any(k.startswith(f"optim.state.{n}.") for k in saved):
                osd["state"][n] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


def _unusable(path: Path, why: str) -> UserError:
    return UserError(f"{path}: corrupted checkpoint, cannot resume from it ({why})")


def _read_state(path: Path) -> dict[str, Any]:
    """`state.json` of the checkpoint folder `path`, checked whole: a JSON object whose step is the folder's, every
    field of the loop's state of its type, and RNG states that the generators accept."""
    try:
        state = json.loads((path / "state.json").read_text())
    except Exception as e:  # noqa: BLE001 - missing, torn or not UTF-8: the checkpoint is unusable
        raise _unusable(path, f"{type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise _unusable(path, "state.json does not hold an object")
    m = STEP_DIR.match(path.name)
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _unusable(path, f"state.json has no step number (step: {step!r})")
    if m is not None and int(m.group(1)) != step:
        raise _unusable(path, f"state.json says step {step}, the folder is {path.name}")
    kinds = {"tokens_seen": int, "skipped_steps": int, "world_size": int, "extra": dict, "best_val_loss": int | float}
    for key, kind in kinds.items():
        v = state.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, kind)):
            raise _unusable(path, f"state.json's '{key}' is {v!r}")
    if "rng" not in state:
        raise _unusable(path, "state.json has no 'rng'")
    try:  # on throwaway generators: what set_rng_state will restore must be whole
        rng = state["rng"]
        random.Random().setstate(_tuples(rng["python"]))
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    except Exception as e:  # noqa: BLE001
        raise _unusable(path, f"state.json's 'rng' is not a random state ({type(e).__name__}: {e})") from None
    return state


def _check_torch_rng(path: Path, where: str, rng: Any) -> None:
    """torch's generator states as `torch_rng_state` writes them, or a clear error naming `where`."""
    if not isinstance(rng, dict) or "cpu" not in rng:
        raise _unusable(path, f"{where} has no torch random state")
    try:
        torch.Generator().set_state(rng["cpu"])
        cuda = rng.get("cuda", [])
        if not isinstance(cuda, list | tuple) or not all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in cuda):
            raise ValueError("the CUDA states are not byte tensors")
    except Exception as e:  # noqa: BLE001
        raise _unusable(path, f"{where}'s torch random state does not load ({type(e).__name__}: {e})") from None


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, optimizer file contents, state) of a checkpoint; a clear error when any part is unreadable or
    incomplete, or when its state names another step than its folder."""
    state = _read_state(path)
    if is_sharded(path):
        if not (path / "dcp" / ".metadata").is_file():
            raise _unusable(path, "FileNotFoundError: dcp/.metadata")
        try:
            rng = torch.load(path / "rng_rank0.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise _unusable(path, f"{type(e).__name__}: {e}") from None
        _check_torch_rng(path, "rng_rank0.pt", rng)
        return {}, {}, state
    try:
        tensors = load_file(str(path / "model.safetensors"))
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable part means the checkpoint is unusable
        raise _unusable(path, f"{type(e).__name__}: {e}") from None
    if not isinstance(opt, dict) or "optimizer" not in opt or not isinstance(opt["optimizer"], dict | None):
        raise _unusable(path, "optimizer.pt holds no optimizer state")
    _check_torch_rng(path, "optimizer.pt", opt.get("torch_rng"))
    return tensors, opt, state


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model, optimizer and RNG states from `path`; returns (loop state, extra tensors)."""
    tensors, opt, state = read_checkpoint(path)
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    weights = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not _is_tied_copy(model, k, weights)]
    if missing or any(k not in own for k in weights):
        bad = missing[0] if missing else next(k for k in weights if k not in own)
        raise UserError(f"{path}: checkpoint does not fit this model (tensor '{bad}'); same config as the run?")
    for k, v in weights.items():
        if own[k].shape != v.shape:
            raise UserError(f"{path}: tensor '{k}' has shape {tuple(v.shape)}, the model has {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v)
    if optimizer is not None and opt.get("optimizer") is not None:
        try:
            optimizer.load_state_dict(opt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: optimizer state does not fit this run ({e})") from None
        if hasattr(optimizer, "consolidate_state_dict"):
            # ZeRO-1 steps with its local optimizer's state; torch's base load also left the wrapper a copy of it
            # cast to the parameters' dtype (a low-bit AdamW's codes in fp32: 4x their bytes), never read again
            optimizer.state.clear()
    set_torch_rng_state(opt["torch_rng"])
    set_rng_state(state["rng"])
    return state, extra


def check_fits(path: Path, model: nn.Module) -> None:
    """A clear error, before anything is written, when the checkpoint at `path` was not written by this model
    (another size or PEFT setting): its tensor names and shapes, read from the file header only."""
    if is_sharded(path):
        return  # torch.distributed.checkpoint compares names and shapes itself when it loads
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith("extra.")}  # noqa: SIM118
    own = model.state_dict()
    for k, v in own.items():
        if k not in saved and not any(k != j and j in saved and v.data_ptr() == own[j].data_ptr() for j in own):
            raise UserError(f"{path}: checkpoint does not fit this model (no tensor '{k}'); same config as the run?")
        if k in saved and saved[k] != tuple(v.shape):
            raise UserError(
                f"{path}: tensor '{k}' has shape {saved[k]}, this model has {tuple(v.shape)}; the run "
                "was made with another model config"
            )
    extra = sorted(set(saved) - set(own))
    if extra:
        raise UserError(f"{path}: checkpoint has tensor '{extra[0]}' that this model lacks; same config as the run?")


def _is_tied_copy(model: nn.Module, name: str, saved: dict[str, torch.Tensor]) -> bool:
    """True when `name` shares storage with a tensor saved under another name (a tied weight)."""
    sd = model.state_dict()
    ptr = sd[name].untyped_storage().data_ptr()
    return any(k != name and k in saved and sd[k].untyped_storage().data_ptr() == ptr for k in sd)
