"""Export LoRA/DoRA adapters in the `peft` library's format (`adapter_model.safetensors`, `adapter_config.json`),
so that `peft.PeftModel.from_pretrained(hf_base, DIR)` on the Hugging Face export of the base reproduces ours."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from llmstages.errors import UserError
from llmstages.outputs import write_dir
from llmstages.peft import adapter_state_dict, peft_config
from llmstages.peft.lora import LoRALinear
from llmstages.store.hf import hf_name

PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our adapter tensors under the names `peft` gives them for the HF model of the same family."""
    family = model.config.family
    if family == "gpt2":
        raise UserError(
            "PEFT-format export of GPT-2 adapters is not supported (its q/k/v are one fused c_attn in HF); "
            "export with --format merged instead"
        )
    out = {}
    for key, t in adapter_state_dict(model).items():
        suffix = next(s for s in PEFT_SUFFIXES if key.endswith(s))
        module = key[: -len(suffix)]
        hf_module = hf_name(module + ".weight", family).removesuffix(".weight")
        out[f"base_model.model.{hf_module}{suffix}"] = t.detach().contiguous().cpu()
    return out


def export_peft(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    cfg = peft_config(model)
    if cfg is None or cfg["method"] not in ("lora", "dora"):
        raise UserError("PEFT-format export needs a LoRA or DoRA model (adapters: use --format merged or ours)")
    tensors = peft_state_dict(model)
    targets = sorted({name.rsplit(".", 1)[-1] for name in cfg["target_modules"]})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg["rank"],
        "lora_alpha": cfg["alpha"],
        "lora_dropout": cfg["dropout"],
        "target_modules": targets,
        "use_rslora": cfg["use_rslora"],
        "use_dora": cfg["method"] == "dora",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    # Every linear layer with one of the target names must carry an adapter, or peft would add fresh ones.
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | LoRALinear) and ".lora_" not in n]
    covered = set(cfg["target_modules"])
    partial = sorted(n for n in layers if n.rsplit(".", 1)[-1] in targets and n not in covered)
    if partial:
        raise UserError(
            f"PEFT-format export: '{partial[0]}' has no adapter but shares a target name; peft cannot express that"
        )

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    return write_dir(Path(path), fill)
