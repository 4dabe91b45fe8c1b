"""Parameter-efficient fine-tuning, applied to a model from outside: LoRA/DoRA swapped in for `nn.Linear`,
bottleneck adapters hooked after attention and MLP. The base model's file and parameter names never change.

    apply_lora(model, rank=16, alpha=32, target_modules="all-linear")
    with disable_adapters(model):      # the frozen base: the DPO/PPO reference without a second copy
        ref_logits = model(x)
"""

from llmstages.peft.adapter import BottleneckAdapter
from llmstages.peft.apply import (
    adapter_state_dict,
    adapters_enabled,
    apply_adapters,
    apply_lora,
    apply_peft,
    disable_adapters,
    merge_lora,
    merged_for_sampling,
    peft_config,
    prepare_policy,
    quantize_frozen,
    trainable_parameters,
)
from llmstages.peft.lora import LoRALinear

__all__ = [
    "BottleneckAdapter",
    "LoRALinear",
    "adapter_state_dict",
    "adapters_enabled",
    "apply_adapters",
    "apply_lora",
    "apply_peft",
    "disable_adapters",
    "merge_lora",
    "merged_for_sampling",
    "peft_config",
    "prepare_policy",
    "quantize_frozen",
    "trainable_parameters",
]
