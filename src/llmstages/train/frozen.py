"""Frozen weights held in the compute dtype.

Under bf16 (fp16) autocast every matrix product casts its fp32 weight to bf16 on each call. A frozen weight
(the base of a LoRA/DoRA layer, the layers around bottleneck adapters, a reference model) never changes, so it
can be cast once: the products see exactly the values autocast would have made (the same round-to-nearest),
with no per-step copies and half the memory and memory traffic. Adapters, their gradients and the optimizer
state stay fp32; embeddings and norms are not touched (the residual stream stays fp32, as under autocast).
QLoRA, the memory-first mode, also holds the frozen token embedding and output head in the compute dtype
(`hold_embeddings`, wherever the model holds NF4 weights): the lookups are cast back to fp32, and the fused
losses multiply the half head in its dtype, as autocast does with an fp32 one.

Only the values a product reads are held: the fp32 originals are gone, so a model saved after training takes
its frozen weights back from where they came from (`restore_frozen` with `base_weights(path)`), and the saved
model keeps the dtype and the values it was loaded with.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from llmstages.model.gpt import GPT
from llmstages.peft.apply import held_at, restore_originals
from llmstages.peft.nf4 import NF4Weight
from llmstages.store.io import ADAPTER_CONFIG, StoredWeights, check_model_dir, stored_weights

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _is_linear(m: nn.Module) -> bool:
    """A module whose `weight` is only read by a matrix product (nn.Linear, a LoRA layer's base)."""
    w = m._parameters.get("weight")
    return w is not None and w.dim() == 2 and hasattr(m, "in_features") and hasattr(m, "out_features")


def hold_frozen(model: nn.Module, precision: str) -> list[str]:
    """Cast the frozen weight and bias of every linear layer to the compute dtype of `precision` (nothing under
    fp32); returns the names of the parameters cast. The output head of every `GPT` in `model` and a weight shared
    with a module that is not linear (an embedding tied to it) are left as they are, unless the model holds NF4
    weights (QLoRA: then `hold_embeddings` casts them too)."""
    dtype = HALF.get(precision)
    if dtype is None:
        return []
    names = hold_embeddings(model, dtype) if quantized_weights(model) else []
    shared = {id(p) for m in model.modules() if not _is_linear(m) for p in m._parameters.values() if p is not None}
    heads = {id(g.lm_head) for g in model.modules() if isinstance(g, GPT)}
    cast: dict[int, nn.Parameter] = {}
    for name, m in model.named_modules():
        if not _is_linear(m) or id(m) in heads:
            continue  # the output head: its own choice (hold_embeddings)
        for attr in ("weight", "bias"):
            p = m._parameters.get(attr)
            if p is None or p.requires_grad or p.dtype != torch.float32 or id(p) in shared:
                continue
            if id(p) not in cast:
                cast[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            setattr(m, attr, cast[id(p)])
            names.append(f"{name}.{attr}" if name else attr)
    return names


def _lookup_in_fp32(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.float()


def hold_embeddings(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Hold the frozen token embedding and output head of every `GPT` in `model` in `dtype` (a tied pair stays one
    tensor); the embedding's lookups are cast back to fp32, so the residual stream stays fp32. Returns the names
    of the parameters cast. A trained or non-fp32 weight, and a head that is not a plain linear layer's or a
    LoRA/DoRA layer's base, are left as they are."""
    names = []
    for prefix, g in model.named_modules():
        if not isinstance(g, GPT):
            continue
        at = f"{prefix}." if prefix else ""
        emb, head = g.tok_emb, g.lm_head
        w = emb.weight
        if not w.requires_grad and w.dtype == torch.float32:
            held = nn.Parameter(w.detach().to(dtype), requires_grad=False)
            emb.weight = held
            names.append(f"{at}tok_emb.weight")
            if not hasattr(emb, "_lookup_hook"):
                emb._lookup_hook = emb.register_forward_hook(_lookup_in_fp32)
            if head._parameters.get("weight") is w:
                head.weight = held
                names.append(f"{at}lm_head.weight")
        del w  # the fp32 embedding goes now, before the head is copied (8B: 2 GiB less at the peak)
        hw = head._parameters.get("weight")
        if _is_linear(head) and not hw.requires_grad and hw.dtype == torch.float32:
            head.weight = nn.Parameter(hw.detach().to(dtype), requires_grad=False)
            names.append(f"{at}lm_head.weight")
    return names


def quantized_weights(model: nn.Module) -> list[str]:
    """The names of the weights held in NF4 (QLoRA, `peft.quantize_frozen`)."""
    return [name for name, m in model.named_modules() if isinstance(m, NF4Weight)]


def restore_frozen(model: nn.Module, names: list[str], originals: Mapping[str, torch.Tensor]) -> None:
    """Put the original tensors back for the parameters `hold_frozen` cast or `peft.quantize_frozen` held in NF4
    (`names` in `model`). `originals` are keyed as in the `GPT` that holds each parameter (`base_weights` of the
    model directory it was loaded from), wherever that GPT sits in `model`: a reward model's trunk, the policy
    beside PPO's critic.

    Each GPT is told where its originals lie (`stored_originals`), and they are put back (`peft.restore_originals`);
    except in a QLoRA model whose originals are still in their files (`StoredWeights`): it is left as it trained,
    and saving it reads each original as it writes it, so the base is never whole in memory (an 8B model's is
    16 GB in bf16)."""
    places = [(n, m) for n, m in model.named_modules() if isinstance(m, GPT)]
    for name in names:
        place, g = next(((p, g) for p, g in places if not p or name.startswith(p + ".")), ("", model))
        key = name[len(place) + 1 :] if place else name
        if key not in originals:
            raise RuntimeError(f"restore_frozen: the original of '{name}' is missing")
        g.stored_originals = {**getattr(g, "stored_originals", {}), key: (originals, held_at(model, name))}
    if not (isinstance(originals, StoredWeights) and quantized_weights(model)):
        restore_originals(model)


def base_weights(path: str) -> Mapping[str, torch.Tensor]:
    """The frozen weights a stage starts from, as it loads them: the model directory `path`, keyed as in the loaded
    `GPT`. Read from the files when asked (`store.io.StoredWeights`), unless the directory carries an adapter:
    then loaded whole, a LoRA/DoRA merged in (peft.prepare_policy does the same)."""
    from llmstages.peft import merge_lora, peft_config
    from llmstages.store import load_model

    if not (check_model_dir(path)[0] / ADAPTER_CONFIG).is_file():
        return stored_weights(path)
    model = load_model(path)
    if (peft_config(model) or {}).get("method") in ("lora", "dora"):
        merge_lora(model)
    return dict(model.state_dict())
