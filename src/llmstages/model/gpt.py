"""One decoder-only transformer for the GPT-2 and Llama families (Mistral and Qwen2 differ only by config).

How it departs from the textbook GPT (Vaswani et al. 2017; Radford et al. 2019), each switched by `ModelConfig`:
- pre-norm blocks, LayerNorm (GPT-2) or RMSNorm (Llama, Zhang & Sennrich 2019);
- learned absolute positions (GPT-2) or rotary embeddings, RoPE (Su et al. 2021), with `rope_theta` and
  the "linear" and "llama3" frequency scalings;
- a GELU MLP (tanh approximation, GPT-2) or a SwiGLU MLP (Shazeer 2020);
- grouped-query attention (Ainslie et al. 2023): `n_kv_heads` key/value heads shared by `n_heads` queries;
- optional biases on q/k/v (Qwen2), on the output projection and the MLP (GPT-2);
- optional sliding-window attention (Mistral);
- tied or untied input embedding and output head.

Its linear layers are `matmul.Linear`: nn.Linear, whose fp32 products on a CPU run through oneDNN (matmul.py).

The module holds no inference state: a KV cache (see `generate.py`) is passed into `forward` from outside, and
PEFT, activation checkpointing and parallelism wrap or swap its submodules from outside too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llmstages.errors import UserError, closest
from llmstages.matmul import Linear

FAMILIES = ("gpt2", "llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer. Field names follow nanoGPT; HF names are mapped in hf.py."""

    family: str = "llama"
    """Architecture family: "gpt2", "llama", "mistral" or "qwen2". Decides the Hugging Face export format."""
    vocab_size: int = 4096
    block_size: int = 256
    """Longest sequence the model accepts (the context length)."""
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    """Key/value heads; fewer than `n_heads` gives grouped-query attention. None means `n_heads`."""
    d_model: int = 256
    head_dim: int | None = None
    """Width of one head. None means `d_model // n_heads`."""
    d_ff: int | None = None
    """MLP hidden width. None means 4 * d_model for GELU and 8/3 * d_model rounded up to 64 for SwiGLU."""
    norm: str = "rmsnorm"
    """ "layernorm" (GPT-2) or "rmsnorm" (Llama)."""
    norm_eps: float = 1e-5
    mlp: str = "swiglu"
    """ "gelu" (GPT-2, tanh approximation) or "swiglu" (Llama)."""
    pos: str = "rope"
    """ "learned" absolute positions (GPT-2) or "rope"."""
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """None, {"rope_type": "linear", "factor": f} or Llama 3's {"rope_type": "llama3", ...}."""
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    """Each token attends to at most this many tokens (itself included); None is full causal attention."""
    dropout: float = 0.0
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Family-specific values carried through import/export unchanged (e.g. HF `torch_dtype`)."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UserError(f"model.family '{self.family}' is not one of {FAMILIES}{closest(self.family, FAMILIES)}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise UserError(f"model.norm must be 'layernorm' or 'rmsnorm', got '{self.norm}'")
        if self.mlp not in ("gelu", "swiglu"):
            raise UserError(f"model.mlp must be 'gelu' or 'swiglu', got '{self.mlp}'")
        if self.pos not in ("learned", "rope"):
            raise UserError(f"model.pos must be 'learned' or 'rope', got '{self.pos}'")
        for name in ("vocab_size", "block_size", "n_layers", "n_heads", "d_model", "n_kv_heads", "head_dim", "d_ff"):
            v = getattr(self, name)  # before any size divides another
            if v is not None and v <= 0:
                raise UserError(f"model.{name} must be positive, got {v}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise UserError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.pos == "rope" and self.head_dim % 2:
            raise UserError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise UserError(f"model.rope_scaling must be a mapping or null, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise UserError(
                    f"rope scaling '{kind}' is not supported (supported: default, linear, llama3); "
                    "refusing rather than computing different positions"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        """A config from our config.json: every key known and of its field's type, named when it is not."""
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                raise UserError(f"{source}: unknown model config key '{key}'{closest(key, names)}")
        for f in fields(cls):
            v = d.get(f.name)
            if v is None:
                continue
            hint = str(f.type).removesuffix(" | None")
            wrong = (
                (hint == "int" and (isinstance(v, bool) or not isinstance(v, int)))
                or (hint == "float" and (isinstance(v, bool) or not isinstance(v, int | float)))
                or (hint == "bool" and not isinstance(v, bool))
                or (hint == "str" and not isinstance(v, str))
            )
            if wrong:
                raise UserError(f"{source}: '{f.name}' must be {'a number' if hint == 'float' else hint}, got {v!r}")
        try:
            return cls(**d)
        except UserError as e:  # name the file the values came from
            raise UserError(f"{source}: {e}") from None

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))


# ----------------------------------------------------------------------------------------------------------------
# Modules


class Cache(Protocol):
    """What attention needs from a KV cache (implemented in generate.py)."""

    pos: int

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, n: int) -> None: ...


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype) * self.weight


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, with the configured scaling applied. Shape (head_dim/2,)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv_freq = torch.where(is_mid, mid, scaled)
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim (the HF/Llama RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, p: float, gqa: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v: (B, nh, T, hd), in q's dtype (autocast's where it is on).

    On a CPU, half precision (bf16/fp16 tensors or autocast) attends in fp32 and casts the result back: torch
    2.13's CPU attention kernels are several times slower in bf16 than in fp32 at these sizes (one thread, 9 heads
    over 3 kv heads: 6.0 ms against 1.3 ms a decode step at batch 64; forward and backward of 8 x 9 heads x 128 x
    64: 31 ms against 10 ms), and fp32 is the more exact of the two. Elsewhere it is torch's SDPA as it comes.
    """
    if q.device.type == "cpu":
        auto = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if auto else q.dtype
        if dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal, dropout_p=p, enable_gqa=gqa
                )
            return y.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=p, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.out_bias)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: Cache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope  # (B, 1, T, hd)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd), S = past + T
        y = attention(q, k, v, mask, is_causal, self.dropout if self.training else 0.0, self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """GELU: down(gelu(up(x))). SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        if self.gated:
            self.gate_proj = Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def make_norm(cfg: ModelConfig) -> nn.Module:
    return (
        nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.norm == "layernorm" else RMSNorm(cfg.d_model, cfg.norm_eps)
    )


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, mask, is_causal, cache))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    """Decoder-only transformer. `forward(idx)` gives next-token logits of shape (B, T, vocab_size)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_rope()
        if self.tok_emb.weight.device.type != "meta":
            self.apply(self._init_weights)
            # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers) at init.
            for name, p in self.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE cos/sin tables; call after building the model on the meta device."""
        if self.config.pos != "rope":
            return
        device = torch.device(device if device is not None else self.tok_emb.weight.device)
        shape = (self.config.block_size, self.config.head_dim)
        if device.type == "meta":  # built for loading: the tables are made once the real device is known
            cos = sin = torch.empty(shape, device=device)
        else:
            t = torch.arange(self.config.block_size, dtype=torch.float32, device=device)
            freqs = torch.outer(t, rope_frequencies(self.config).to(device))
            emb = torch.cat((freqs, freqs), dim=-1)  # (block_size, head_dim)
            cos, sin = emb.cos(), emb.sin()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states, (B, T, d_model). Reward and value heads read these.

        `mask` is either a (B, S) key mask (1 = token, 0 = padding; S = cached + new tokens) or a boolean
        (B, 1, T, S) attention mask used as given (True = may attend), e.g. block-diagonal for packed rows.
        `position_ids` (B, T) default to the count of real tokens before each one (so left padding is harmless).
        """
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        if past + T > self.config.block_size:
            raise UserError(
                f"sequence of {past + T} tokens is longer than the model's context of {self.config.block_size}"
            )
        if position_ids is None:
            if mask is not None and mask.dim() == 2:
                position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]
            else:
                position_ids = torch.arange(past, past + T, device=idx.device).expand(B, T)
        attn_mask, is_causal = self._attention_mask(mask, T, past, idx.device)
        x = self.tok_emb(idx)
        rope = None
        if self.config.pos == "learned":
            x = x + self.pos_emb(position_ids)
        else:
            rope = (self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1))
            rope = (rope[0].to(x.dtype), rope[1].to(x.dtype)) if x.dtype != torch.float32 else rope
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, attn_mask, is_causal, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T). See `hidden_states` for the arguments."""
        return self.lm_head(self.hidden_states(idx, mask=mask, position_ids=position_ids, cache=cache))

    def _attention_mask(
        self, mask: torch.Tensor | None, T: int, past: int, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """The SDPA mask for T new queries after `past` cached keys, and whether `is_causal` can do instead."""
        if mask is not None and mask.dim() == 4:
            return mask.bool(), False
        S = past + T
        window = self.config.sliding_window
        windowed = window is not None and window < S
        if mask is None and not windowed:
            if past == 0:
                return None, True  # plain causal: the fast kernels
            if T == 1:
                return None, False  # one new query sees every cached key
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        allowed = k_pos <= q_pos  # (T, S)
        if windowed:
            allowed = allowed & (k_pos > q_pos - window)
        allowed = allowed[None, None]  # (1, 1, T, S)
        if mask is not None:
            allowed = allowed & mask[:, None, None, :S].bool()
            # A padding query would see no key at all (NaN in SDPA); let it see itself. Its output is unused.
            allowed = allowed | (k_pos == q_pos)[None, None]
        return allowed, False


def num_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in seen.values())


def count_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Parameter count from the config alone (no model built). `embeddings=False` leaves out token/position
    embeddings and an untied head, the count used in the 6N FLOPs rule (Kaplan et al. 2020)."""
    d, hd, L = cfg.d_model, cfg.head_dim, cfg.n_layers
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if cfg.qkv_bias else 0) + (d if cfg.out_bias else 0)
    n_mats = 3 if cfg.mlp == "swiglu" else 2
    mlp = n_mats * d * cfg.d_ff + ((n_mats - 1) * cfg.d_ff + d if cfg.mlp_bias else 0)
    norm = d * (2 if cfg.norm == "layernorm" else 1)
    body = L * (attn + mlp + 2 * norm) + norm
    if not embeddings:
        return body
    emb = cfg.vocab_size * d + (cfg.block_size * d if cfg.pos == "learned" else 0)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return body + emb + head


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 L h_q T (PaLM, Chowdhery et al. 2022, app. B),
    with N the non-embedding parameters plus the output head (a matmul), and T the sequence length."""
    T = seq_len or cfg.block_size
    n = count_params(cfg, embeddings=False) + cfg.vocab_size * cfg.d_model
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
