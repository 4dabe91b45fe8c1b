"""The model: one decoder (gpt.py) and its presets (presets.py), generation with a KV cache (generate.py), reward
and value heads (heads.py).

Reading and writing model directories sits one layer up, in `llmstages.store`."""

from llmstages.model.generate import Generation, KVCache, generate
from llmstages.model.gpt import GPT, ModelConfig, count_params, flops_per_token, num_params
from llmstages.model.presets import PRESETS, preset

__all__ = [
    "GPT",
    "PRESETS",
    "Generation",
    "KVCache",
    "ModelConfig",
    "count_params",
    "flops_per_token",
    "generate",
    "num_params",
    "preset",
]
