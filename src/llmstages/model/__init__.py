"""The model: one decoder (gpt.py), generation with a KV cache (generate.py), model directories (io.py, hf.py)."""

from llmstages.model.generate import Generation, KVCache, generate
from llmstages.model.gpt import GPT, PRESETS, ModelConfig, count_params, flops_per_token, num_params, preset
from llmstages.model.io import (
    export_hf,
    load_config,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    save_model,
)

__all__ = [
    "GPT",
    "PRESETS",
    "Generation",
    "KVCache",
    "ModelConfig",
    "count_params",
    "export_hf",
    "flops_per_token",
    "generate",
    "load_config",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "num_params",
    "preset",
    "save_model",
]
