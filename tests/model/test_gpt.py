"""The model on its own: presets, parameter counts, masks and positions."""

from __future__ import annotations

import pytest
import torch

from llmstages.errors import UserError
from llmstages.model import GPT, PRESETS, ModelConfig, count_params, flops_per_token, num_params, preset


@pytest.mark.parametrize("name", ["gpt2_tiny", "llama_tiny"])
def test_forward_shapes_and_param_count(name):
    model = GPT(preset(name))
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    assert model(x).shape == (2, 16, model.config.vocab_size)
    assert num_params(model) == count_params(model.config)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_counts_match_published_sizes(name):
    # count_params is analytic; spot-check it against a meta-device build (no memory spent).
    with torch.device("meta"):
        model = GPT(preset(name))
    assert num_params(model) == count_params(model.config)


def test_known_sizes():
    assert round(count_params(preset("gpt2_124m")) / 1e6) == 124  # GPT-2 small
    assert round(count_params(preset("llama2_7b")) / 1e9, 2) == 6.74  # Llama 2 7B: 6,738,415,616
    assert round(count_params(preset("llama3_8b")) / 1e9, 2) == 8.03


def test_flops_per_token_rule():
    cfg = preset("gpt2_124m")
    n = count_params(cfg, embeddings=False) + cfg.vocab_size * cfg.d_model
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_packed_rows_equal_separate_sequences():
    """A block-diagonal mask with per-document positions gives each document the logits it has alone."""
    model = GPT(preset("llama_tiny", n_layers=2)).eval()
    a, b = torch.randint(0, 4096, (1, 7)), torch.randint(0, 4096, (1, 5))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([0] * 7 + [1] * 5)
    causal = torch.tril(torch.ones(12, 12, dtype=torch.bool))
    mask = (causal & (doc[:, None] == doc[None, :]))[None, None]
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        out = model(packed, mask=mask, position_ids=pos)
        assert torch.allclose(out[:, :7], model(a), atol=1e-5)
        assert torch.allclose(out[:, 7:], model(b), atol=1e-5)


def test_sliding_window_is_causal_within_the_window():
    torch.manual_seed(0)
    full = GPT(preset("llama_tiny", n_layers=2)).eval()
    windowed = GPT(preset("llama_tiny", n_layers=2, sliding_window=6)).eval()
    windowed.load_state_dict(full.state_dict())
    x = torch.randint(0, 4096, (1, 10))
    with torch.no_grad():
        a, b = full(x), windowed(x)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-5)  # first 6 tokens see everything either way
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_too_long_input_and_bad_config():
    model = GPT(preset("gpt2_tiny", block_size=8))
    with pytest.raises(UserError, match="longer than the model's context of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(UserError, match="did you mean 'n_heads'"):
        ModelConfig.from_dict({"n_head": 4})
    with pytest.raises(UserError, match="not a multiple"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(UserError, match="unknown model preset"):
        preset("llama_tiniest")


def test_tied_embeddings_share_storage():
    model = GPT(preset("llama_tiny"))
    assert model.lm_head.weight is model.tok_emb.weight


# The published config.json values of each checkpoint (the Hugging Face model pages), built by transformers itself.
PUBLISHED = {
    "smollm2_135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)),
    "smollm2_360m": ("llama", dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                   num_attention_heads=15, num_key_value_heads=5, tie_word_embeddings=True)),
    "qwen2_5_0_5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3_2_1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_real_shape_presets_have_the_published_parameter_counts(name):
    """Each real-shape preset against transformers' own model built (on the meta device) from the published config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    family, fields = PUBLISHED[name]
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields))
    cfg = preset(name)
    assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.n_layers) == (fields["vocab_size"], fields["hidden_size"],
                                                                     fields["intermediate_size"],
                                                                     fields["num_hidden_layers"])  # fmt: skip
    assert count_params(cfg) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("autocast", [True, False])
def test_cpu_attention_in_half_precision_attends_in_fp32(autocast):
    """On a CPU under bf16 (autocast, or bf16 tensors as when sampling) attention is computed in fp32 and rounded
    once: the output is the textbook softmax(q k^T / sqrt(d) + causal mask) v in fp32, rounded to bf16 (within
    one bf16 unit; torch's bf16 kernel, which rounds its intermediate products, is further off)."""
    from llmstages.model.gpt import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = attention(q, k, v, None, True, 0.0, False)
    scores = (q.float() @ k.float().transpose(-1, -2)) / 16**0.5
    scores = scores.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.softmax(scores, -1) @ v.float()
    assert y.dtype == torch.bfloat16
    assert ((y.float() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()
