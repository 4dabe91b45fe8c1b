"""Parameter-efficient fine-tuning, applied to a model from outside: LoRA/DoRA swapped in for `nn.Linear`,
bottleneck adapters hooked after attention and MLP. The base model's file and parameter names never change.

    apply_lora(model, rank=16, alpha=32, target_modules="all-linear")
    with disable_adapters(model):      # the frozen base: the DPO/PPO reference without a second copy
        ref_logits = model(x)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmstages.errors import UserError
from llmstages.peft.adapter import BottleneckAdapter, insert_adapters
from llmstages.peft.lora import LoRALinear

ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
METHODS = ("none", "lora", "dora", "adapter")

__all__ = [
    "BottleneckAdapter",
    "LoRALinear",
    "adapter_state_dict",
    "adapters_enabled",
    "apply_adapters",
    "apply_lora",
    "apply_peft",
    "disable_adapters",
    "load_adapter",
    "merge_lora",
    "merged_for_sampling",
    "peft_config",
    "prepare_policy",
    "save_adapter",
    "trainable_parameters",
]


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        if targets == "all-linear":
            return not name.endswith("lm_head")
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    use_dora: bool = False,
) -> list[str]:
    """Swap every targeted `nn.Linear` for a `LoRALinear` and freeze everything else; returns the swapped names.

    `target_modules`: names matched as suffixes (["q_proj", "v_proj"]), "all-linear" (every linear layer but the
    output head), or one regular expression matched against full module names.
    """
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)]
    names = [n for n in linear if _matches(n, target_modules) and ".lora_" not in n]
    if not names:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise UserError(
            f"peft.target_modules {target_modules!r} matched no linear module; there are: {', '.join(kinds)}"
        )
    sizes = [(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names]
    _refuse_beyond_memory(16 * rank * sum(i + o for i, o in sizes), f"peft.rank={rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoRALinear.from_linear(
            getattr(parent, child), rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora
        )
        setattr(parent, child, lora)
    model.peft = {
        "method": "dora" if use_dora else "lora",
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "target_modules": names,
        "use_rslora": use_rslora,
    }
    return names


def _refuse_beyond_memory(need: float, setting: str) -> None:
    """Refuse adapters whose parameters with their gradients and AdamW moments (16 bytes each in fp32) exceed the
    machine's memory, before they are built: `peft.rank=100000000` was killed by the kernel instead."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no check
        return
    if need > memory:
        raise UserError(
            f"{setting}: the adapters would take {need / 2**30:.1f} GiB with their gradients and optimizer state, "
            f"more than this machine's {memory / 2**30:.1f} GiB"
        )


def apply_adapters(model: nn.Module, bottleneck: int = 64, activation: str = "relu", dropout: float = 0.0) -> int:
    """Insert bottleneck adapters after attention and MLP in every block and freeze the rest."""
    blocks, d = len(getattr(model, "blocks", [])), model.config.d_model  # two adapters a block, d x b each way
    _refuse_beyond_memory(16 * blocks * 2 * 2 * bottleneck * d, f"peft.bottleneck={bottleneck}")
    for p in model.parameters():
        p.requires_grad_(False)
    n = insert_adapters(model, bottleneck, activation, dropout)
    model.peft = {"method": "adapter", "bottleneck": bottleneck, "activation": activation, "dropout": dropout}
    return n


def apply_peft(model: nn.Module, method: str, **kw: Any) -> None:
    """Apply `method` ("none", "lora", "dora", "adapter") with its options (rank, alpha, dropout, target_modules,
    use_rslora for LoRA/DoRA; bottleneck, activation, dropout for adapters)."""
    if method not in METHODS:
        raise UserError(f"peft.method must be one of {', '.join(METHODS)}, got '{method}'")
    if method in ("lora", "dora"):
        keys = ("rank", "alpha", "dropout", "target_modules", "use_rslora")
        apply_lora(model, use_dora=method == "dora", **{k: kw[k] for k in keys if k in kw})
    elif method == "adapter":
        apply_adapters(model, **{k: kw[k] for k in ("bottleneck", "activation", "dropout") if k in kw})


def prepare_policy(model: nn.Module, method: str, **options: Any) -> bool:
    """Ready a fine-tuned model for another stage (reward, DPO, PPO, GRPO). A LoRA/DoRA it carries is merged, so
    the fine-tuned model becomes the base (and the reference); then the run's `method` is applied. Returns True
    when the reference is this model with its adapters disabled, False when it needs a frozen copy (full
    fine-tuning, or bottleneck adapters that came with the model and keep training)."""
    loaded = (peft_config(model) or {}).get("method")
    if loaded in ("lora", "dora"):
        merge_lora(model)
        loaded = None
    if loaded is None:
        model.requires_grad_(True)
        apply_peft(model, method, **options)
    return loaded is None and peft_config(model) is not None


def peft_config(model: nn.Module) -> dict[str, Any] | None:
    return getattr(model, "peft", None)


def _is_peft_param(name: str) -> bool:
    return ".lora_" in name or "_adapter." in name


def trainable_parameters(model: nn.Module, report: bool = False) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once; `report` prints them."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    if report:
        print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / max(total, 1):.2%})")
    return trainable, total


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the PEFT tensors (LoRA A/B, DoRA magnitudes, adapter layers)."""
    return {k: v for k, v in model.state_dict().items() if _is_peft_param(k)}


def _peft_modules(model: nn.Module) -> Iterator[LoRALinear | BottleneckAdapter]:
    for m in model.modules():
        if isinstance(m, LoRALinear | BottleneckAdapter):
            yield m


def adapters_enabled(model: nn.Module) -> bool:
    """True when the model has PEFT modules and they are not switched off by `disable_adapters`."""
    return any(not m.disabled for m in _peft_modules(model))


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes with its frozen base weights only (merged LoRA is refused)."""
    mods = list(_peft_modules(model))
    if any(isinstance(m, LoRALinear) and m.merged for m in mods):
        raise RuntimeError("disable_adapters: LoRA weights are merged; unmerge them first")
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


@contextlib.contextmanager
def merged_for_sampling(model: nn.Module) -> Iterator[bool]:
    """Inside the block each enabled LoRA/DoRA layer is one matrix product, x W'^T + b with W' its
    `merged_weight()`, made once on entry: sampling pays nothing per token for the adapters. The training weights
    keep their bits (W' is a separate tensor, dropped on exit). Only where the products run in fp32 (fp32 weights,
    no autocast) and parameters are not sharded: in bf16 the sum W + s B A would be rounded to bf16, losing a
    small early update (the unmerged layer adds it after the base product), so there the adapters stay apart.
    Yields whether it merged."""
    mods = [m for m in _peft_modules(model) if isinstance(m, LoRALinear) and not m.disabled and not m.merged]
    ok = bool(mods) and all(
        m.weight.dtype == torch.float32
        and not hasattr(m.weight, "placements")  # an FSDP/TP shard
        and not torch.is_autocast_enabled(m.weight.device.type)
        for m in mods
    )
    if ok:
        for m in mods:
            m.sampling_weight = m.merged_weight()
    try:
        yield ok
    finally:
        for m in mods:
            m.sampling_weight = None


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA/DoRA into its base weight and put plain `nn.Linear` layers back, in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.weight.detach(), requires_grad=True)
            if m.bias is not None:
                lin.bias = nn.Parameter(m.bias.detach(), requires_grad=True)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
    if getattr(model, "peft", None) and model.peft["method"] in ("lora", "dora"):
        del model.peft
    return model


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Write `adapter.safetensors` and `adapter_config.json` into the directory `path`."""
    cfg = peft_config(model)
    if cfg is None:
        raise ValueError("the model has no PEFT modules")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}, str(path / ADAPTER_FILE)
    )
    (path / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# The keys of each method's adapter_config.json (as `save_adapter` writes it): key -> (check, what it must be).
_ADAPTER_KEYS: dict[str, dict[str, tuple[Any, str]]] = {
    "lora": {
        "rank": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        "alpha": (lambda v: _is_number(v) and v > 0, "a positive number"),
        "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "target_modules": (
            lambda v: isinstance(v, list) and v and all(isinstance(t, str) for t in v),
            "a list of module names",
        ),
        "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    },
    "adapter": {
        "bottleneck": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        "activation": (lambda v: isinstance(v, str), "a string"),
        "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    },
}
_ADAPTER_KEYS["dora"] = _ADAPTER_KEYS["lora"]


def check_adapter_config(cfg: Any, source: str) -> None:
    """An adapter config as `save_adapter` writes it: an object with its method (and, for LoRA/DoRA, the layers
    it adapts), every key of the right type; anything else (a peft-library config, no method) is an error naming
    `source`."""
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    method = cfg.get("method")
    if method is None:
        hint = (
            f" (this is the peft library's format, peft_type {cfg['peft_type']}; llmstages reads the adapter_config"
            ".json it writes itself)"
            if "peft_type" in cfg
            else ""
        )
        raise UserError(f"{source}: no 'method' (one of lora, dora, adapter){hint}")
    if method not in _ADAPTER_KEYS:
        raise UserError(f"{source}: 'method' must be one of lora, dora, adapter, got {method!r}")
    needed = ("target_modules",) if method in ("lora", "dora") else ()  # the rest have defaults
    for key, (ok, what) in _ADAPTER_KEYS[method].items():
        if key in needed and key not in cfg:
            raise UserError(f"{source}: '{key}' is missing (a {method} adapter names the layers it adapts)")
        if key in cfg and not ok(cfg[key]):
            raise UserError(f"{source}: '{key}' must be {what}, got {cfg[key]!r}")


def load_adapter(model: nn.Module, path: str | Path) -> None:
    """Apply the adapter saved in `path` to `model` (which holds the base weights) and load its tensors."""
    path = Path(path)
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise UserError(f"{path / ADAPTER_CONFIG}: cannot read the adapter config ({e})") from None
    check_adapter_config(cfg, str(path / ADAPTER_CONFIG))
    kw = {k: v for k, v in cfg.items() if k != "method"}
    if cfg["method"] in ("lora", "dora"):
        kw["target_modules"] = "|".join(re.escape(t) for t in cfg["target_modules"])
    apply_peft(model, cfg["method"], **kw)
    try:
        tensors = load_file(str(path / ADAPTER_FILE))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path / ADAPTER_FILE}: cannot read adapter tensors ({e})") from None
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(tensors))
    if missing or set(tensors) - set(own):
        bad = missing[0] if missing else sorted(set(tensors) - set(own))[0]
        raise UserError(f"{path / ADAPTER_FILE}: adapter tensor '{bad}' does not fit the model")
    model.load_state_dict(tensors, strict=False)
    if cfg["method"] in ("lora", "dora"):
        model.peft["target_modules"] = cfg["target_modules"]
