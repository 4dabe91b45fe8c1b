"""Hugging Face interop: local HF directories (GPT-2, Llama, Mistral, Qwen2) into our model and back.

Only local paths: nothing is downloaded. Weights are read from safetensors only (one file or an index of shards);
pickled `pytorch_model.bin` files are refused rather than unpickled.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from llmstages.data.records import read_json_object
from llmstages.errors import UserError
from llmstages.model.gpt import ModelConfig
from llmstages.model.presets import GPT2_BLOCK

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file (config.json, an index): not UTF-8, invalid JSON, null or an array is an error naming
    the file."""
    return read_json_object(path)


# ----------------------------------------------------------------------------------------------------------------
# Configs


GPT2_KEYS = ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")
LLAMA_KEYS = ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")
OPTIONAL_INTS = ("n_inner", "max_position_embeddings", "num_key_value_heads", "head_dim", "sliding_window")
OPTIONAL_NUMBERS = ("rope_theta", "rms_norm_eps", "layer_norm_epsilon", "initializer_range")
OPTIONAL_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "scale_attn_weights")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_hf_keys(hf: dict[str, Any], source: str, required: tuple[str, ...]) -> None:
    """Key by key, before any is used: the sizes a family needs present as positive integers, optional ones of the
    right type, token ids integers (or, for the EOS, a list of them)."""
    for key in required:
        if key not in hf:
            raise UserError(f"{source}: '{key}' is missing (a {hf['model_type']} config needs {', '.join(required)})")
    for key in (*required, *OPTIONAL_INTS):
        v = hf.get(key)
        if v is not None and (not _is_int(v) or v <= 0):
            raise UserError(f"{source}: '{key}' must be a positive integer, got {v!r}")
    for key in OPTIONAL_NUMBERS:
        v = hf.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v <= 0):
            raise UserError(f"{source}: '{key}' must be a positive number, got {v!r}")
    for key in OPTIONAL_BOOLS:
        if key in hf and not isinstance(hf[key], bool):
            raise UserError(f"{source}: '{key}' must be true or false, got {hf[key]!r}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = hf.get(key)
        ok = (
            v is None
            or (_is_int(v) and v >= 0)
            or (key == "eos_token_id" and isinstance(v, list) and v and all(_is_int(x) and x >= 0 for x in v))
        )
        if not ok:
            raise UserError(f"{source}: '{key}' must be a token id (a non-negative integer), got {v!r}")


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our config for an HF `config.json`. Options we do not implement are refused, never ignored."""
    try:
        return _config_from_hf(hf, source)
    except UserError as e:  # ModelConfig's own checks (sizes that do not divide) name the file too
        if str(e).startswith(source):
            raise
        raise UserError(f"{source}: {e}") from None


def _config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise UserError(f"{source}: model_type '{mt}' is not supported (supported: {', '.join(SUPPORTED)})")
    check_hf_keys(hf, source, GPT2_KEYS if mt == "gpt2" else LLAMA_KEYS)
    ids = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if mt == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise UserError(f"{source}: GPT-2 activation_function '{act}' is not supported (only tanh GELU)")
        for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
            if hf.get(key, ok) != ok:
                raise UserError(f"{source}: GPT-2 option {key}={hf[key]} is not supported")
        if not hf.get("scale_attn_weights", True):
            raise UserError(f"{source}: GPT-2 option scale_attn_weights=false is not supported")
        d = hf["n_embd"]
        return ModelConfig(
            family="gpt2",
            vocab_size=hf["vocab_size"],
            block_size=hf["n_positions"],
            n_layers=hf["n_layer"],
            n_heads=hf["n_head"],
            d_model=d,
            d_ff=hf.get("n_inner") or 4 * d,
            **GPT2_BLOCK,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            init_std=hf.get("initializer_range", 0.02),
            **ids,
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act '{hf['hidden_act']}' is not supported (only silu, i.e. SwiGLU)")
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise UserError(f"{source}: '{key}' must be an object or null, got {hf[key]!r}")
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    scaling = rope or hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    sliding = None
    if mt == "mistral":
        sliding = hf.get("sliding_window")
    elif mt == "qwen2" and hf.get("use_sliding_window"):
        raise UserError(
            f"{source}: Qwen2 use_sliding_window=true (sliding window on some layers) is not supported; "
            "refusing rather than attending differently from the original"
        )
    if sliding is not None and sliding >= hf.get("max_position_embeddings", 0):
        sliding = None  # a window as long as the context is plain causal attention
    bias = hf.get("attention_bias", False)
    return ModelConfig(
        family=mt,
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_model=hf["hidden_size"],
        head_dim=hf.get("head_dim"),
        d_ff=hf["intermediate_size"],
        norm="rmsnorm",
        mlp="swiglu",
        pos="rope",
        rope_theta=float(theta),
        rope_scaling=scaling,
        qkv_bias=True if mt == "qwen2" else bias,
        out_bias=False if mt == "qwen2" else bias,
        mlp_bias=hf.get("mlp_bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        sliding_window=sliding,
        init_std=hf.get("initializer_range", 0.02),
        **ids,
    )


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The HF `config.json` for our config; refuses configs the HF class of the family cannot express."""
    problems = []
    want = (
        dict(norm="layernorm", mlp="gelu", pos="learned")
        if cfg.family == "gpt2"
        else dict(norm="rmsnorm", mlp="swiglu", pos="rope")
    )
    problems += [f"{k}={getattr(cfg, k)} (needs {v})" for k, v in want.items() if getattr(cfg, k) != v]
    dtype_name = str(dtype).removeprefix("torch.")
    common = dict(
        vocab_size=cfg.vocab_size,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        torch_dtype=dtype_name,
    )
    if cfg.family == "gpt2":
        if not (cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias):
            problems.append("GPT-2 has biases on every linear layer")
        if cfg.n_kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.d_model:
            problems.append("GPT-2 has no grouped-query attention and head_dim = d_model / n_heads")
        if cfg.sliding_window:
            problems.append("GPT-2 has no sliding window")
        hf = dict(
            model_type="gpt2",
            architectures=["GPT2LMHeadModel"],
            n_positions=cfg.block_size,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,
            activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    else:
        if cfg.family == "qwen2" and (not cfg.qkv_bias or cfg.out_bias):
            problems.append("Qwen2 has biases on q/k/v and none on the output projection")
        if cfg.family != "qwen2" and cfg.qkv_bias != cfg.out_bias:
            problems.append(f"{cfg.family} has one attention_bias for q/k/v/o (a Qwen2 config has qkv-only bias)")
        if cfg.family in ("qwen2", "mistral") and cfg.mlp_bias:
            problems.append(f"{cfg.family} has no MLP bias")
        if cfg.sliding_window and cfg.family != "mistral":
            problems.append("only the mistral family exports a sliding window")
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        hf = dict(
            model_type=cfg.family,
            architectures=[arch[cfg.family]],
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            max_position_embeddings=cfg.block_size,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            rope_scaling=cfg.rope_scaling,
            hidden_act="silu",
            attention_dropout=0.0,
        )
        if cfg.family == "llama":
            hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        elif cfg.family == "mistral":
            hf.update(sliding_window=cfg.sliding_window)
        else:
            hf.update(use_sliding_window=False, sliding_window=None)
    if problems:
        raise UserError(f"cannot export as HF '{cfg.family}': " + "; ".join(problems))
    return {**hf, **common}


# ----------------------------------------------------------------------------------------------------------------
# Weight names. One function per family maps each of our names to the HF name; the inverse is derived from it.

_LLAMA = [
    (r"^tok_emb\.", "model.embed_tokens."),
    (r"^blocks\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^blocks\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^blocks\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^blocks\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
    (r"^norm\.", "model.norm."),
]
_GPT2 = [
    (r"^tok_emb\.", "transformer.wte."),
    (r"^pos_emb\.", "transformer.wpe."),
    (r"^blocks\.(\d+)\.attn_norm\.", r"transformer.h.\1.ln_1."),
    (r"^blocks\.(\d+)\.mlp_norm\.", r"transformer.h.\1.ln_2."),
    (r"^blocks\.(\d+)\.attn\.o_proj\.", r"transformer.h.\1.attn.c_proj."),
    (r"^blocks\.(\d+)\.mlp\.up_proj\.", r"transformer.h.\1.mlp.c_fc."),
    (r"^blocks\.(\d+)\.mlp\.down_proj\.", r"transformer.h.\1.mlp.c_proj."),
    (r"^norm\.", "transformer.ln_f."),
]


def hf_name(ours: str, family: str) -> str:
    """HF parameter name of one of ours (GPT-2's q/k/v all map to the fused `c_attn`)."""
    if family == "gpt2":
        ours = re.sub(r"^blocks\.(\d+)\.attn\.[qkv]_proj\.", r"transformer.h.\1.attn.c_attn.", ours)
    for pat, rep in _GPT2 if family == "gpt2" else _LLAMA:
        new = re.sub(pat, rep, ours)
        if new != ours:
            return new
    return ours  # lm_head.weight and c_attn keep their names


def _is_conv1d(hf: str) -> bool:
    """GPT-2 stores linear weights as Conv1D, (in, out): the transpose of nn.Linear's (out, in)."""
    return hf.endswith(".weight") and re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", hf) is not None


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names and layouts (tied head left out, as HF saves it)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        hf = hf_name(name, cfg.family)
        if cfg.family == "gpt2" and ".c_attn." in hf:
            if hf in out:
                continue
            parts = [sd[re.sub(r"\.[qkv]_proj\.", f".{p}_proj.", name)] for p in "qkv"]
            t = torch.cat(parts, dim=0)
        out[hf] = (t.t() if cfg.family == "gpt2" and _is_conv1d(hf) else t).contiguous()
    return out


def hf_layout(
    expected: dict[str, torch.Size], saved: dict[str, torch.Size], cfg: ModelConfig, source: str
) -> dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """Where each of our tensors (`expected`: name -> shape) lies in a HF checkpoint whose tensors have the shapes
    `saved`: our name -> (HF name, what turns the saved tensor into ours: GPT-2's Conv1D transposed, its fused
    c_attn cut into q, k, v). Checked from the shapes alone, before any data is read: missing or mis-shaped is a
    UserError naming the HF tensor."""
    rename = {}
    if cfg.family == "gpt2":  # original GPT-2 files have no "transformer." prefix
        rename = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: k for k in saved}
    out: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
    for name, shape in expected.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        hf = hf_name(name, cfg.family)
        stored = rename.get(hf, hf)
        if stored not in saved:
            raise UserError(f"{source}: tensor '{hf}' is missing")
        have = tuple(saved[stored])
        conv = cfg.family == "gpt2" and _is_conv1d(hf)
        got = have[::-1] if conv and len(have) == 2 else have
        part = None
        if ".c_attn." in hf:
            d, part = cfg.d_model, "qkv".index(name.split(".")[-2][0])
            if got[0] != 3 * d:
                raise UserError(f"{source}: tensor '{hf}' has shape {have}, expected 3 x {d}")
            got = (d, *got[1:])
        if got != tuple(shape):
            raise UserError(f"{source}: tensor '{hf}' has shape {got}, expected {tuple(shape)}")
        out[name] = (stored, functools.partial(_to_ours, conv=conv, part=part, d=cfg.d_model))
    return out


def _to_ours(t: torch.Tensor, conv: bool, part: int | None, d: int) -> torch.Tensor:
    t = t.t() if conv else t
    return t if part is None else t[part * d : (part + 1) * d].contiguous()  # not a view of the whole c_attn


# ----------------------------------------------------------------------------------------------------------------
# Files


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of the model directory `path`: `model.safetensors`, or the shards listed in
    `model.safetensors.index.json`."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise UserError(
            f"{path}: weights are only in pickle files (.bin/.pt); llmstages reads safetensors only. "
            "Convert them first, e.g. save_pretrained(..., safe_serialization=True) in transformers"
        )
    else:
        raise UserError(f"{path}: no model.safetensors in this directory")
    for f in files:
        if not (path / f).is_file():
            raise UserError(f"{path / f}: cannot read safetensors (no such file)")
    return [path / f for f in files]


def stored_tensors(path: Path) -> dict[str, Stored]:
    """Where every tensor of the model directory `path` lies (`safetensors_files`), from the headers alone: each
    is read when asked (`Stored.read`), so a caller holds one tensor at a time."""
    out: dict[str, Stored] = {}
    for f in safetensors_files(path):
        out.update(stored_file(f))
    return out


def saved_float_dtype(path: Path) -> torch.dtype:
    """The dtype of the first floating tensor of the model directory `path`, read from the headers (fp32 if it
    has none)."""
    for file in safetensors_files(path):
        with open(file, "rb") as f:
            _, header = _header(f, file)
        for info in header.values():
            dt = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
            if dt is not None and dt.is_floating_point:
                return dt
    return torch.float32


def _unreadable(path: Path, why: str) -> UserError:
    return UserError(f"{path}: cannot read safetensors ({why})")


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _header(f: BinaryIO, path: Path) -> tuple[int, dict[str, Any]]:
    """(its length, the header without `__metadata__`) of the safetensors file `path`, open as `f`."""
    size = path.stat().st_size
    n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
    if not 2 <= n <= size - 8:
        raise _unreadable(path, f"a header of {n} bytes in a file of {size}")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _unreadable(path, f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "the header is not a JSON object")
    header.pop("__metadata__", None)
    return n, header


CONVERT_BYTES = 1 << 24
"""The most saved bytes `Stored.read` holds apart while it converts a tensor to another dtype."""


@dataclass(frozen=True)
class Stored:
    """One tensor of a safetensors file: where its bytes lie, its shape and its saved dtype."""

    file: Path
    name: str
    offset: int
    """From the start of the file."""
    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(
        self, dtype: torch.dtype | None = None, f: BinaryIO | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The tensor in memory of its own (not a mapping of the file), a floating one converted to `dtype` through
        a buffer of at most `CONVERT_BYTES`: never the whole tensor twice. `f`: the file, already open; `buffer`:
        uint8 bytes to convert through, reused from one read to the next (a fresh one each time leaves holes in
        the heap that the converted tensors cannot fill: 1.26x the fp32 bytes to load a bf16 model, not 1.16x)."""
        if f is None:
            with open(self.file, "rb") as f:
                return self.read(dtype, f, buffer)
        saved = self.dtype
        t = torch.empty(self.shape, dtype=dtype if dtype is not None and saved.is_floating_point else saved)
        f.seek(self.offset)
        if t.dtype == saved:
            self._fill(f, t)
            return t
        flat, step = t.view(-1), max(CONVERT_BYTES // saved.itemsize, 1)
        if buffer is None or buffer.numel() < min(flat.numel(), step) * saved.itemsize:
            buffer = torch.empty(min(flat.numel(), step) * saved.itemsize, dtype=torch.uint8)
        for i in range(0, flat.numel(), step):
            piece = flat[i : i + step]
            chunk = buffer[: piece.numel() * saved.itemsize].view(saved)
            self._fill(f, chunk)
            piece.copy_(chunk)
        return t

    def _fill(self, f: BinaryIO, into: torch.Tensor) -> None:
        if f.readinto(memoryview(into.reshape(-1).view(torch.uint8).numpy())) != into.numel() * into.element_size():
            raise _unreadable(self.file, f"tensor '{self.name}' runs past the end of the file")


def stored_file(path: Path) -> dict[str, Stored]:
    """The tensors of one safetensors file (an 8-byte little-endian header length, a JSON header of dtype, shape
    and byte offsets, then the data), located from its header; a damaged header is a UserError naming the file."""
    with open(path, "rb") as f:
        n, header = _header(f, path)
    out = {}
    for name, info in header.items():
        try:
            (start, end), shape = info["data_offsets"], tuple(int(x) for x in info["shape"])
            saved = SAFETENSORS_DTYPES[info["dtype"]]
            if any(x < 0 for x in shape):
                raise ValueError(f"negative dimension in shape {list(shape)}")
            numel = torch.Size(shape).numel()
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise _unreadable(path, f"tensor '{name}': {type(e).__name__} {e}") from None
        nbytes = numel * saved.itemsize
        if not (isinstance(start, int) and isinstance(end, int) and start >= 0 and end - start == nbytes):
            raise _unreadable(path, f"tensor '{name}' spans bytes {start}..{end}, its shape and dtype need {nbytes}")
        out[name] = Stored(path, name, 8 + n + start, shape, saved)
    return out


def read_safetensors_file(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, each read into memory of its own, floating ones converted to `dtype`
    one at a time. Not mapped from the file: a mapping stays resident, the whole file of it, while any one of its
    tensors lives (a norm's weight kept a 2 GB file in memory after QLoRA had quantized the rest)."""
    stored = stored_file(path)
    buffer = conversion_buffer(stored.values())
    with open(path, "rb") as f:
        return {name: s.read(dtype, f, buffer) for name, s in stored.items()}


def conversion_buffer(tensors: Iterable[Stored]) -> torch.Tensor:
    """A buffer for `Stored.read` to convert any of `tensors` through: the largest one's bytes, at most
    `CONVERT_BYTES`."""
    largest = max((s.dtype.itemsize * math.prod(s.shape) for s in tensors), default=0)
    return torch.empty(min(largest, CONVERT_BYTES), dtype=torch.uint8)


@dataclass(frozen=True)
class Deferred:
    """A tensor to be written that is read only when its turn comes (`write_safetensors`)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor | Deferred], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file one tensor at a time: the header from the shapes and dtypes, then each tensor's
    bytes, a `Deferred` one read just before it is written and let go after, so the file never needs all of its
    tensors in memory at once. Wider dtypes first, then by name, so every tensor starts aligned to its dtype."""
    codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    names = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for k in names:
        t = tensors[k]
        nbytes = torch.Size(t.shape).numel() * t.dtype.itemsize
        header[k] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts on a multiple of 8
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for k in names:
            want = tensors[k]
            t = want.read() if isinstance(want, Deferred) else want
            if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
                raise RuntimeError(f"write_safetensors: '{k}' came as {t.dtype} {tuple(t.shape)}, declared otherwise")
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
