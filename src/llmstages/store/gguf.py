"""GGUF files for llama.cpp (and Ollama, LM Studio): `llmstages export --format gguf [--dtype f32|f16|q8_0]`.

Written with the `gguf` package's writer, for the Llama, Mistral and Qwen2 families. What travels: the
architecture's hyper-parameters (llama.cpp's `{arch}.*` keys), every weight under llama.cpp's tensor names, the
BPE tokenizer (tokens, token types, merges, the pre-tokenizer's name, special ids) and the chat template (the
tokenizer's own, or the built-in one written as jinja). A LoRA is merged first.

Two layouts differ from ours. llama.cpp's `llama` architecture rotates interleaved pairs of each head's
dimensions where we (and transformers) rotate its two halves, so q and k are permuted into that order for it
(the `qwen2` architecture rotates halves, as we do); Llama 3's RoPE scaling travels as `rope_freqs.weight`, the
factor by which each frequency is divided.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model.gpt import GPT, ModelConfig, rope_frequencies
from llmstages.outputs import disk_full_is_an_error

DTYPES = ("f32", "f16", "q8_0")
BUILTIN_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""The built-in chat template of data/chat.py (`<|role|> content<|eos|>` a turn) as jinja."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("export --format gguf needs the gguf package (pip install gguf)") from None
    return gguf


def arch_of(cfg: ModelConfig) -> str:
    """llama.cpp's architecture name for a config, or a UserError saying why it has none."""
    if cfg.family not in ("llama", "mistral", "qwen2"):
        raise UserError(f"GGUF export supports the llama, mistral and qwen2 families, not {cfg.family}")
    if cfg.sliding_window:
        raise UserError("GGUF export: a sliding-window model is not supported (llama.cpp's llama arch has none)")
    if cfg.qkv_bias and cfg.family != "qwen2" or cfg.out_bias or cfg.mlp_bias:
        raise UserError("GGUF export: biases are supported on q/k/v of the qwen2 family only")
    return "qwen2" if cfg.family == "qwen2" else "llama"


def interleave_heads(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows (heads * head_dim, d) from our half-split RoPE order to llama.cpp's interleaved pairs: in each
    head, rows (0, d/2, 1, d/2 + 1, ...)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensors(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's names (q/k interleaved for the llama arch)."""
    cfg, sd = model.config, model.state_dict()
    out = {"token_embd.weight": sd["tok_emb.weight"], "output_norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {
        "attn_norm": "attn_norm.weight",
        "attn_q": "attn.q_proj.weight",
        "attn_k": "attn.k_proj.weight",
        "attn_v": "attn.v_proj.weight",
        "attn_output": "attn.o_proj.weight",
        "ffn_norm": "mlp_norm.weight",
        "ffn_gate": "mlp.gate_proj.weight",
        "ffn_up": "mlp.up_proj.weight",
        "ffn_down": "mlp.down_proj.weight",
    }
    for i in range(cfg.n_layers):
        for theirs, ours in names.items():
            w = sd[f"blocks.{i}.{ours}"]
            if arch == "llama" and theirs in ("attn_q", "attn_k"):
                w = interleave_heads(w, cfg.n_heads if theirs == "attn_q" else cfg.n_kv_heads)
            out[f"blk.{i}.{theirs}.weight"] = w
        if cfg.qkv_bias:
            for p in ("q", "k", "v"):
                out[f"blk.{i}.attn_{p}.bias"] = sd[f"blocks.{i}.attn.{p}_proj.bias"]
    s = cfg.rope_scaling or {}
    if s.get("rope_type", s.get("type")) == "llama3":
        plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
        out["rope_freqs.weight"] = (plain / rope_frequencies(cfg).double()).float()
    return out


def pre_tokenizer_name(tok: Tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: GPT-2's byte-level split ("gpt-2", ours), Llama 3's
    ("llama-bpe"), Qwen2's ("qwen2") or SmolLM's ("smollm"); a UserError for one it would split differently."""
    pre = json.loads(tok.tk.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    patterns = [str((p.get("pattern") or {}).get("Regex", "")) for p in parts if p.get("type") == "Split"]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if patterns and kinds[-1] == "ByteLevel":
        if "\\p{N}{1,3}" in patterns[0]:
            return "llama-bpe"
        if "\\p{N}|" in patterns[0] or "\\p{N}" in patterns[0]:
            return "qwen2"
    raise UserError(
        f"GGUF export: the tokenizer's pre-tokenizer ({', '.join(map(str, kinds)) or 'none'}) has no llama.cpp "
        "counterpart known here (gpt-2, llama-bpe, qwen2, smollm)"
    )


def _vocabulary(tok: Tokenizer, n_vocab: int, gguf) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their types, merges) with the model's rows beyond the tokenizer padded as unused."""
    spec = json.loads(tok.tk.to_str())
    if spec["model"]["type"] != "BPE":
        raise UserError(f"GGUF export supports BPE tokenizers, not {spec['model']['type']}")
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    added = {a["id"] for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            kind = gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added else None
            types.append(int(kind if kind is not None else gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, types, merges


def export_gguf(model: GPT, tok: Tokenizer, path: str | Path, dtype: str = "f16", name: str = "model") -> Path:
    """Write `model` and `tok` as one GGUF file at `path` (a temporary file renamed into place)."""
    gguf = _gguf()
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)} for GGUF, got '{dtype}'")
    cfg = model.config
    arch = arch_of(cfg)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens, the model's vocabulary {cfg.vocab_size}")
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    tensors = _tensors(model, arch)
    tokens, types, merges = _vocabulary(tok, cfg.vocab_size, gguf)
    pre = pre_tokenizer_name(tok)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(name)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s["factor"])
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, token_id in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if token_id is not None:
            getattr(w, f"add_{key}_token_id")(token_id)
    w.add_add_bos_token(tok.bos_id is not None and tok.encode("a", add_special_tokens=True)[:1] == [tok.bos_id])
    w.add_chat_template(tok.chat_template or BUILTIN_TEMPLATE)
    for tensor_name, t in tensors.items():
        data = t.detach().float().cpu().numpy()
        if data.ndim == 1 or dtype == "f32" or tensor_name == "rope_freqs.weight":
            w.add_tensor(tensor_name, data.astype(np.float32))
        elif dtype == "f16" or data.shape[-1] % 32:
            w.add_tensor(tensor_name, data.astype(np.float16))
        else:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(tensor_name, gguf.quants.quantize(data, q), raw_dtype=q)
    with disk_full_is_an_error(path, "GGUF file"):
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            tmp.replace(path)
        except BaseException:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                w.close()
            tmp.unlink(missing_ok=True)
            raise
    return path
