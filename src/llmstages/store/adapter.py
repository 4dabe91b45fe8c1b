"""An adapter on disk: `adapter.safetensors` (only the PEFT tensors) and `adapter_config.json` (the method and
its options, checked key by key when read). A QLoRA adapter's config says `"quantize_base": "nf4"`: it was trained
over the NF4 base, and loading holds the base in NF4 again so that the model computes what it trained to."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from llmstages.errors import UserError
from llmstages.peft import adapter_state_dict, apply_peft, peft_config, quantize_frozen

ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


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
        "quantize_base": (lambda v: v in ("none", "nf4"), "none or nf4"),
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


def load_adapter(model: nn.Module, path: str | Path, quantized: bool = True) -> None:
    """Apply the adapter saved in `path` to `model` (which holds the base weights) and load its tensors. A QLoRA
    adapter's base is then held in NF4, as it was in training (`quantized`; False: the base stays as saved)."""
    path = Path(path)
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise UserError(f"{path / ADAPTER_CONFIG}: cannot read the adapter config ({e})") from None
    check_adapter_config(cfg, str(path / ADAPTER_CONFIG))
    kw = {k: v for k, v in cfg.items() if k not in ("method", "quantize_base")}
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
    if cfg.get("quantize_base") == "nf4":
        model.peft["quantize_base"] = "nf4"
        if quantized:
            quantize_frozen(model, reset_magnitudes=False)  # DoRA's magnitudes are the trained ones
