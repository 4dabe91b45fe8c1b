"""Model presets: plain functions, each a call to `ModelConfig` with the published sizes.

preset("smollm2_135m")                 # the shape of SmolLM2-135M (random weights until loaded)
preset("llama_tiny", n_layers=2)       # any field overridden
"""

from __future__ import annotations

from typing import Any

from llmstages.errors import UserError, closest
from llmstages.model.gpt import ModelConfig

GPT2_BLOCK: dict[str, Any] = dict(
    norm="layernorm", mlp="gelu", pos="learned", qkv_bias=True, out_bias=True, mlp_bias=True
)
"""What makes a GPT-2 block: LayerNorm, GELU MLP, learned positions, biases on every linear layer."""


def gpt2(**kw: Any) -> ModelConfig:
    """GPT-2 architecture (Radford et al. 2019); sizes default to the 124M model."""
    base = dict(
        family="gpt2",
        vocab_size=50257,
        block_size=1024,
        n_layers=12,
        n_heads=12,
        d_model=768,
        tie_embeddings=True,
        norm_eps=1e-5,
        **GPT2_BLOCK,
    )
    return ModelConfig(**{**base, **kw})


def gpt2_124m(**kw: Any) -> ModelConfig:
    return gpt2(**kw)


def gpt2_350m(**kw: Any) -> ModelConfig:
    return gpt2(**{"n_layers": 24, "n_heads": 16, "d_model": 1024, **kw})


def gpt2_tiny(**kw: Any) -> ModelConfig:
    """A ~1M-parameter GPT-2 for tests and CPU demos."""
    return gpt2(**{"vocab_size": 4096, "block_size": 256, "n_layers": 4, "n_heads": 4, "d_model": 128, **kw})


def llama(**kw: Any) -> ModelConfig:
    """Llama architecture (Touvron et al. 2023): RMSNorm, RoPE, SwiGLU, no biases, untied head."""
    base = dict(family="llama", norm="rmsnorm", mlp="swiglu", pos="rope", norm_eps=1e-5)
    return ModelConfig(**{**base, **kw})


def llama_tiny(**kw: Any) -> ModelConfig:
    """A ~3M-parameter Llama with grouped-query attention, sized for a 2-core CPU (see BUILTIN_WORLD.md)."""
    return llama(
        **{
            "vocab_size": 4096,
            "block_size": 256,
            "n_layers": 4,
            "n_heads": 4,
            "n_kv_heads": 2,
            "d_model": 256,
            "tie_embeddings": True,
            **kw,
        }
    )


def llama2_7b(**kw: Any) -> ModelConfig:
    return llama(
        **{
            "vocab_size": 32000,
            "block_size": 4096,
            "n_layers": 32,
            "n_heads": 32,
            "d_model": 4096,
            "d_ff": 11008,
            "norm_eps": 1e-5,
            **kw,
        }
    )


def llama3_8b(**kw: Any) -> ModelConfig:
    return llama(
        **{
            "vocab_size": 128256,
            "block_size": 8192,
            "n_layers": 32,
            "n_heads": 32,
            "n_kv_heads": 8,
            "d_model": 4096,
            "d_ff": 14336,
            "rope_theta": 500000.0,
            **kw,
        }
    )


def qwen2_0_5b(**kw: Any) -> ModelConfig:
    return llama(
        **{
            "family": "qwen2",
            "vocab_size": 151936,
            "block_size": 32768,
            "n_layers": 24,
            "n_heads": 14,
            "n_kv_heads": 2,
            "d_model": 896,
            "d_ff": 4864,
            "rope_theta": 1000000.0,
            "norm_eps": 1e-6,
            "qkv_bias": True,
            "tie_embeddings": True,
            **kw,
        }
    )


def smollm2_135m(**kw: Any) -> ModelConfig:
    """SmolLM2-135M (Hugging Face 2024): a Llama with 30 layers, d=576, 9 heads / 3 KV heads, tied embeddings."""
    base = dict(vocab_size=49152, block_size=8192, n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, d_ff=1536)
    return llama(**{**base, "rope_theta": 100000.0, "tie_embeddings": True, **kw})


def smollm2_360m(**kw: Any) -> ModelConfig:
    """SmolLM2-360M: 32 layers, d=960, 15 heads / 5 KV heads, tied embeddings."""
    base = dict(vocab_size=49152, block_size=8192, n_layers=32, n_heads=15, n_kv_heads=5, d_model=960, d_ff=2560)
    return llama(**{**base, "rope_theta": 100000.0, "tie_embeddings": True, **kw})


def qwen2_5_0_5b(**kw: Any) -> ModelConfig:
    """Qwen2.5-0.5B: the Qwen2 0.5B shape (24 layers, d=896, 14 heads / 2 KV heads, q/k/v biases, tied)."""
    return qwen2_0_5b(**kw)


def llama3_2_1b(**kw: Any) -> ModelConfig:
    """Llama 3.2 1B: 16 layers, d=2048, 32 heads / 8 KV heads, tied embeddings, llama3 RoPE scaling (factor 32)."""
    scaling = dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    base = dict(vocab_size=128256, block_size=131072, n_layers=16, n_heads=32, n_kv_heads=8, d_model=2048, d_ff=8192)
    return llama(**{**base, "rope_theta": 500000.0, "rope_scaling": scaling, "tie_embeddings": True, **kw})


def mistral_7b(**kw: Any) -> ModelConfig:
    return llama(
        **{
            "family": "mistral",
            "vocab_size": 32768,
            "block_size": 32768,
            "n_layers": 32,
            "n_heads": 32,
            "n_kv_heads": 8,
            "d_model": 4096,
            "d_ff": 14336,
            "rope_theta": 1000000.0,
            **kw,
        }
    )


PRESETS = {
    f.__name__: f
    for f in (
        gpt2_124m,
        gpt2_350m,
        gpt2_tiny,
        llama_tiny,
        llama2_7b,
        llama3_8b,
        qwen2_0_5b,
        mistral_7b,
        smollm2_135m,
        smollm2_360m,
        qwen2_5_0_5b,
        llama3_2_1b,
    )
}


def preset(name: str, **kw: Any) -> ModelConfig:
    """The named preset, with fields overridden by `kw`."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset '{name}'{closest(name, list(PRESETS))}; presets: {', '.join(PRESETS)}")
    return PRESETS[name](**kw)
