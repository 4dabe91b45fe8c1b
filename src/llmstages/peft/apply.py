"""Applying PEFT to a model and taking it off: LoRA/DoRA swapped in for the linear layers a pattern names,
bottleneck adapters hooked after attention and MLP, the adapters switched off (the reference), merged into the
weights (export, sampling). Which parameters train is decided here; the adapter files are `store/adapter.py`'s."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from llmstages.errors import UserError
from llmstages.matmul import Linear
from llmstages.model.gpt import GPT
from llmstages.peft.adapter import BottleneckAdapter, insert_adapters
from llmstages.peft.lora import LoRALinear
from llmstages.peft.nf4 import BLOCK, NF4Linear, NF4Weight

METHODS = ("none", "lora", "dora", "adapter")


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
    """Swap every targeted `nn.Linear` (or `NF4Linear`: a base quantized as it was read) for a `LoRALinear` and
    freeze everything else; returns the swapped names.

    `target_modules`: names matched as suffixes (["q_proj", "v_proj"]), "all-linear" (every linear layer but the
    output head), or one regular expression matched against full module names.
    """
    inside = {id(c) for m in model.modules() if isinstance(m, LoRALinear) for c in m.modules()}  # A, B and itself
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | NF4Linear) and id(m) not in inside]
    names = [n for n in linear if _matches(n, target_modules)]
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


def prepare_policy(model: nn.Module, method: str, quantize_base: str = "none", **options: Any) -> bool:
    """Ready a model for a fine-tuning stage (SFT, reward, DPO, PPO, GRPO). A LoRA/DoRA it carries is merged, so
    the fine-tuned model becomes the base (and the reference); then the run's `method` is applied, and with
    quantize_base=nf4 the frozen base is quantized (QLoRA). Returns True when the reference is this model with its
    adapters disabled, False when it needs a frozen copy (full fine-tuning, or bottleneck adapters that came with
    the model and keep training)."""
    loaded = (peft_config(model) or {}).get("method")
    if loaded in ("lora", "dora"):
        merge_lora(model)
        loaded = None
    if loaded is None:
        model.requires_grad_(True)
        apply_peft(model, method, **options)
    if quantize_base == "nf4":
        if (peft_config(model) or {}).get("method") not in ("lora", "dora"):
            raise UserError("peft.quantize_base=nf4 (QLoRA) needs peft.method lora or dora")
        quantize_frozen(model)
        model.peft["quantize_base"] = "nf4"  # saved with the adapter: loading re-quantizes the base it trained on
    elif quantize_base != "none":
        raise UserError(f"peft.quantize_base must be none or nf4, got '{quantize_base}'")
    return loaded is None and peft_config(model) is not None


def quantizable(model: nn.Module) -> list[str]:
    """The linear layers QLoRA holds in NF4 (names of `nn.Linear` and `LoRALinear` modules): all but each `GPT`'s
    output head, a layer whose weight an embedding shares, and a weight that is not a whole number of 64-weight
    blocks. Decided by the modules alone, so it holds on the meta device too (`store.load_model` quantizes them as
    it reads them)."""
    heads = {id(g.lm_head) for g in model.modules() if isinstance(g, GPT)}
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear | LoRALinear) for p in m.parameters(False)}
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | LoRALinear)
        and id(m) not in heads
        and isinstance(m.weight, torch.Tensor)
        and id(m.weight) not in shared
        and m.weight.numel() % BLOCK == 0
    ]


def quantize_frozen(model: nn.Module, reset_magnitudes: bool = True) -> list[str]:
    """QLoRA: hold every frozen `quantizable` weight of `model` in NF4 (peft/nf4.py), the base of each LoRA/DoRA
    layer and the linear layers it does not adapt. DoRA's magnitudes are set to the row norms of the quantized base,
    so that a fresh adapter still starts equal to its base (`reset_magnitudes`; False for a trained adapter loaded
    back). Returns the names of the weights quantized."""
    names = []
    for name in quantizable(model):
        m = model.get_submodule(name)
        if m.weight.requires_grad:
            continue
        q = NF4Weight.quantize(m.weight)
        if isinstance(m, LoRALinear):
            del m.weight
            m.weight = q
            if m.use_dora and reset_magnitudes:
                with torch.no_grad():
                    m.lora_magnitude_vector.copy_(q.dequantize(torch.float32).norm(p=2, dim=1))
        else:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, NF4Linear(q, m.bias))
        names.append(f"{name}.weight" if name else "weight")
    return names


def peft_config(model: nn.Module) -> dict[str, Any] | None:
    return getattr(model, "peft", None)


def adapter_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the PEFT tensors, found by module class: a `LoRALinear`'s own tensors (A, B, DoRA's
    magnitudes; not the base weight and bias it wraps) and every tensor of a `BottleneckAdapter`."""
    keys = set()
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, LoRALinear):
            keys |= {prefix + k for k, _ in m.named_parameters() if k not in ("weight", "bias")}
        elif isinstance(m, BottleneckAdapter):
            keys |= {prefix + k for k, _ in m.named_parameters()}
    return keys


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once, weights held in NF4 (QLoRA) included."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    quantized = sum(m.shape[0] * m.shape[1] for m in model.modules() if isinstance(m, NF4Weight))
    total = sum(p.numel() for p in seen.values()) + quantized
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the PEFT tensors (LoRA A/B, DoRA magnitudes, adapter layers)."""
    keys = adapter_keys(model)
    return {k: v for k, v in model.state_dict().items() if k in keys}


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
    small early update (the unmerged layer adds it after the base product), so there the adapters stay apart; nor
    over an NF4 base (QLoRA), which would hold a dense copy of every weight it quantized. Yields whether it merged."""
    mods = [m for m in _peft_modules(model) if isinstance(m, LoRALinear) and not m.disabled and not m.merged]
    ok = bool(mods) and all(
        isinstance(m.weight, torch.Tensor)
        and m.weight.dtype == torch.float32
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
    """Fold every LoRA/DoRA into its base weight and put plain `nn.Linear` layers back, in place. A base held in
    NF4 (QLoRA) is dequantized first: the merged model is the quantized base plus the adapters; unless the
    originals are still at hand (`restore_originals`): then they are the base."""
    restore_originals(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, NF4Linear | LoRALinear) and isinstance(m.weight, NF4Weight):
            w = m.weight.dequantize()
            del m.weight
            m.weight = nn.Parameter(w, requires_grad=False)
        if isinstance(m, NF4Linear | LoRALinear):
            weight, bias = m.weight, m.bias  # an unadapted NF4 layer: its (now dense) frozen weight as it is
            if isinstance(m, LoRALinear):
                m.merge()
                weight = nn.Parameter(m.weight.detach(), requires_grad=True)
                bias = nn.Parameter(m.bias.detach(), requires_grad=True) if m.bias is not None else None
            lin = Linear(m.in_features, m.out_features, bias=bias is not None, device="meta")
            lin.weight = weight
            if bias is not None:
                lin.bias = bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
    if getattr(model, "peft", None) and model.peft["method"] in ("lora", "dora"):
        del model.peft
    return model


def held_at(model: nn.Module, name: str) -> nn.Parameter | nn.Module | None:
    """The parameter or module (an `NF4Weight`) that `model` holds under the dotted `name`; None if there is none."""
    owner, _, attr = name.rpartition(".")
    try:
        m = model.get_submodule(owner) if owner else model
    except AttributeError:
        return None
    return m._parameters.get(attr, m._modules.get(attr))


def restore_originals(model: nn.Module) -> None:
    """Put back as plain frozen parameters the original weights recorded in `stored_originals` (key -> (originals,
    what holds it now), set by `train.frozen.restore_frozen`) on every GPT of `model`: at the end of training, or,
    for a QLoRA model whose save reads them from their files, before anything changes its base (a merge)."""
    back: dict[int, nn.Parameter] = {}  # a weight two places share stays shared
    for g in model.modules():
        for key, (originals, held) in getattr(g, "stored_originals", {}).items():
            if held_at(g, key) is not held:
                continue  # replaced since
            if id(held) not in back:
                back[id(held)] = nn.Parameter(originals[key].to(held.device), requires_grad=False)
            owner, _, attr = key.rpartition(".")
            m = g.get_submodule(owner) if owner else g
            if attr in m._modules:
                del m._modules[attr]
            m._parameters[attr] = back[id(held)]
        if hasattr(g, "stored_originals"):
            del g.stored_originals
