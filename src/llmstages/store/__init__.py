"""Storage: model directories with their adapters and heads (io.py, heads.py), and Hugging Face, PEFT and GGUF
in and out (hf.py, peft.py, gguf.py). Above `model/` and `peft/`, which know nothing of files."""

from llmstages.store.io import (
    export_hf,
    load_config,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    save_model,
)

__all__ = ["export_hf", "load_config", "load_model", "load_model_and_tokenizer", "load_tokenizer", "save_model"]
