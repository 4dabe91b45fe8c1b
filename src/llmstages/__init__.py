"""llmstages: pre-training, fine-tuning and alignment of language models in one PyTorch-native codebase."""

from llmstages.model import GPT, ModelConfig, generate, preset
from llmstages.store import export_hf, load_model, load_tokenizer, save_model

__version__ = "0.1.0"
__all__ = [
    "GPT",
    "ModelConfig",
    "__version__",
    "export_hf",
    "generate",
    "load_model",
    "load_tokenizer",
    "preset",
    "save_model",
]
