"""Model directories: ours (`config.json` with our fields, `model.safetensors`, `tokenizer.json`) or a Hugging
Face one (`config.json` with `model_type`), told apart by their config and loaded the same way."""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmstages.data.records import why_missing
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model.gpt import GPT, ModelConfig
from llmstages.outputs import disk_full_is_an_error, write_dir
from llmstages.peft import adapter_state_dict, adapters_enabled, peft_config
from llmstages.peft.apply import held_at, quantizable
from llmstages.peft.nf4 import NF4Linear, NF4Weight
from llmstages.store import hf as hf_io
from llmstages.store.adapter import ADAPTER_CONFIG, load_adapter, save_adapter

FORMAT_KEY = "llmstages_format"


def hub_caches() -> list[Path]:
    """Where the Hugging Face tools keep downloaded repositories: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub (XDG_CACHE_HOME honoured)."""
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"]).expanduser()]
    if os.environ.get("HF_HOME"):
        return [Path(os.environ["HF_HOME"]).expanduser() / "hub"]
    xdg = os.environ.get("XDG_CACHE_HOME")
    return [(Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"]


def from_hub_cache(name: str) -> Path | None:
    """The local snapshot of hub repository `owner/name[@revision]` (revision: a branch or tag under refs/, or a
    commit hash; default main) in the cache's documented layout (models--owner--name/refs, snapshots), without
    any network call; None when it is not there."""
    repo, _, revision = name.partition("@")
    revision = revision or "main"
    for cache in hub_caches():
        folder = cache / f"models--{repo.replace('/', '--')}"
        ref = folder / "refs" / revision
        commit = _commit_of(ref, repo) if ref.is_file() else revision
        snapshot = folder / "snapshots" / commit
        if commit and snapshot.is_dir():
            return snapshot
    return None


def _commit_of(ref: Path, repo: str) -> str:
    """The commit hash a cache's `refs/<revision>` file holds (40 hex digits); an empty or binary one is named."""
    raw = ref.read_bytes().strip()
    text = raw.decode("ascii", errors="replace")
    if not re.fullmatch(r"[0-9a-f]{40}", text):
        what = "is empty" if not raw else "does not hold a commit hash (40 hex digits)"
        raise UserError(
            f"{ref} {what}: the cached copy of {repo} is damaged; download it again (e.g. `huggingface-cli "
            f"download {repo}`)"
        )
    return text


def looks_like_hub_id(text: str) -> bool:
    repo = text.partition("@")[0]
    return repo.count("/") == 1 and not text.startswith((".", "/", "~")) and all(repo.split("/"))


def resolve_model_path(path: str | Path) -> Path:
    """`path` itself when it exists; a hub id (owner/name[@revision]) found in the local Hugging Face cache
    becomes its snapshot folder; otherwise a clear error (for a hub id, naming the caches looked in)."""
    p = Path(path)
    if p.exists():
        return p
    reason = why_missing(p)
    if reason != "does not exist":  # a symlink loop, or a link to nothing
        raise UserError(f"model directory '{path}' {reason}")
    if looks_like_hub_id(str(path)):
        snapshot = from_hub_cache(str(path))
        if snapshot is not None:
            return snapshot
        where = ", ".join(str(c) for c in hub_caches())
        raise UserError(
            f"model directory '{path}' does not exist, and as a hub id it is not in the local Hugging Face cache "
            f"({where}; set HF_HUB_CACHE or HF_HOME for another); llmstages never downloads: fetch it first, "
            "e.g. with `huggingface-cli download`"
        )
    raise UserError(f"model directory '{path}' does not exist")


def check_model_dir(path: str | Path) -> tuple[Path, dict]:
    """The directory (a hub id resolved from the local cache) and its parsed config.json; a clear error for a
    missing folder or file."""
    p = resolve_model_path(path)
    if not p.is_dir():
        raise UserError(f"'{path}' is not a directory (expected a model directory with config.json)")
    if not (p / "config.json").is_file():
        raise UserError(f"{p}: no config.json in this directory")
    return p, hf_io.read_json(p / "config.json")


def load_config(path: str | Path) -> ModelConfig:
    p, raw = check_model_dir(path)
    source = str(p / "config.json")
    if "model_type" in raw:
        return hf_io.config_from_hf(raw, source)
    if FORMAT_KEY not in raw:
        raise UserError(f"{source}: neither an llmstages config nor a Hugging Face one (no 'model_type')")
    raw = {k: v for k, v in raw.items() if k != FORMAT_KEY}
    return ModelConfig.from_dict(raw, source)


class StoredWeights(Mapping[str, torch.Tensor]):
    """The weights of a model directory (ours or a Hugging Face one) under our names, each read from its file when
    asked: `weights[name]` in the dtype it was made with, `read(name, dtype)` in another. Names and shapes are
    checked against `expected` (name -> shape, our model's) from the headers alone, before any data is read."""

    def __init__(
        self, path: Path, cfg: ModelConfig, expected: dict[str, torch.Size], dtype: torch.dtype | None = torch.float32
    ) -> None:
        stored = hf_io.stored_tensors(path)
        source = str(path / "model.safetensors")
        if "model_type" in hf_io.read_json(path / "config.json"):
            layout = hf_io.hf_layout(expected, {k: v.shape for k, v in stored.items()}, cfg, source)
            self._where = {name: (stored[hf], fn) for name, (hf, fn) in layout.items()}
        else:
            self._where = {}
            for name, shape in expected.items():
                if name == "lm_head.weight" and cfg.tie_embeddings:
                    continue
                if name not in stored:
                    raise UserError(f"{source}: tensor '{name}' is missing")
                if stored[name].shape != tuple(shape):
                    raise UserError(
                        f"{source}: tensor '{name}' has shape {stored[name].shape}, expected {tuple(shape)}"
                    )
                self._where[name] = (stored[name], None)
            extra = sorted(set(stored) - set(expected))
            if extra:
                raise UserError(f"{source}: unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all)")
        if cfg.tie_embeddings:  # the head is the embedding
            self._where["lm_head.weight"] = self._where["tok_emb.weight"]
        self.dtype = dtype
        self.saved_dtype = hf_io.saved_float_dtype(path)
        self.shapes = {k: torch.Size(v) for k, v in expected.items() if k in self._where}
        self._buffer = hf_io.conversion_buffer(s for s, _ in self._where.values())  # reused by every read

    def read(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """The tensor `name`, floating ones in `dtype` (None: as saved)."""
        stored, to_ours = self._where[name]
        t = stored.read(dtype, buffer=self._buffer)
        return to_ours(t) if to_ours is not None else t

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name, self.dtype)

    def __contains__(self, name: object) -> bool:
        return name in self._where  # without reading it

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def stored_weights(path: str | Path, dtype: torch.dtype | None = torch.float32) -> StoredWeights:
    """The base weights of the model directory `path` (its adapter, if any, left out), read when asked."""
    p, _ = check_model_dir(path)
    cfg = load_config(p)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    return StoredWeights(p, cfg, expected, dtype)


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    quantized: bool = True,
    quantize_base: str = "none",
) -> GPT:
    """Our model with the weights of the directory `path` (ours or a Hugging Face one).

    The model is built on the meta device and the loaded tensors are assigned to it one at a time as they are
    read, so no memory is spent on a random initialisation or on a second copy. `dtype=None` keeps the dtype the
    weights were saved in; either way the model remembers it (`model.saved_dtype`), and saving writes the weights
    in it again. A QLoRA run's final model is its original base plus an adapter trained over that base in NF4: the
    base is quantized again, as it trained (`quantized=False`: held as saved, to merge the adapter into the
    original weights). `quantize_base="nf4"` (QLoRA's setup) holds the `quantizable` linear weights of a
    directory without an adapter in NF4 as they are read: the model is never whole in full precision.
    """
    p, raw = check_model_dir(path)
    cfg = load_config(p)
    with torch.device("meta"):
        model = GPT(cfg)
    weights = StoredWeights(p, cfg, {k: v.shape for k, v in model.state_dict().items()}, dtype)
    adapter = _adapter_config(p)
    nf4 = adapter is None and quantize_base == "nf4" or quantized and (adapter or {}).get("quantize_base") == "nf4"
    on_read = {f"{n}.weight": n for n in quantizable(model)} if nf4 else {}
    sd, low = {}, {}
    for name in weights:
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied below
        if name in on_read:  # read as saved, quantized, let go: never the whole model in full precision
            low[on_read[name]] = q = NF4Weight.quantize(weights.read(name, None))
            q.orig_dtype = dtype or weights.saved_dtype  # what it dequantizes to, as if it had been loaded whole
        else:
            sd[name] = weights[name]
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    for name, q in low.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, NF4Linear(q, model.get_submodule(name).bias))
    model.reset_rope(device)
    model = model.to(device)
    model.saved_dtype = weights.saved_dtype  # save_model and export_hf write the weights back in it
    if adapter is not None:  # a PEFT run's model directory: base weights plus the adapter
        load_adapter(model, p, quantized)
    return model


def _adapter_config(path: Path) -> dict | None:
    """The adapter config of the model directory `path` (None without one); checked when the adapter is loaded."""
    if not (path / ADAPTER_CONFIG).is_file():
        return None
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return {}  # load_adapter says what is wrong with it
    return cfg if isinstance(cfg, dict) else {}


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.load(check_model_dir(path)[0])


def load_model_and_tokenizer(
    path: str | Path, device: torch.device | str = "cpu", quantize_base: str = "none"
) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer of a directory, checked to fit together: every token id has an embedding row.
    `quantize_base`: as in `load_model`."""
    model, tok = load_model(path, device=device, quantize_base=quantize_base), load_tokenizer(path)
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{path}: the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size "
            f"{model.config.vocab_size} (tokenizer.json from another model?)"
        )
    return model, tok


def _state_dict(model: GPT) -> dict[str, torch.Tensor | hf_io.Deferred]:
    """The base model's tensors (PEFT tensors, if any, are saved apart by `save_adapter`), floating ones in the
    dtype the model was loaded from (`saved_dtype`; a model built here keeps its own). A weight whose original is
    still in its file (`stored_originals`: a QLoRA run's base, see `train.frozen.restore_frozen`) is `Deferred`:
    read from there when it is written."""
    dtype = getattr(model, "saved_dtype", None)
    stored = {k: src for k, (src, held) in getattr(model, "stored_originals", {}).items() if held_at(model, k) is held}
    inside = tuple(f"{k}." for k in stored)  # an NF4 weight's codes and scales
    skip = adapter_state_dict(model).keys()
    sd = {k: v for k, v in model.state_dict().items() if k not in skip and not k.startswith(inside)}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # safetensors refuses shared tensors; the tie is in the config
        stored.pop("lm_head.weight", None)
    out: dict[str, torch.Tensor | hf_io.Deferred] = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in sd.items()
    }
    for k, src in stored.items():
        saved = dtype or src.saved_dtype
        out[k] = hf_io.Deferred(tuple(src.shapes[k]), saved, functools.partial(src.read, k, saved))
    return out


def save_model(model: GPT, path: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write our model directory atomically: a crash mid-write leaves any previous directory intact.
    A model with PEFT modules is written as its base weights plus `adapter.safetensors` / `adapter_config.json`."""

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps({FORMAT_KEY: 1, **model.config.to_dict()}, indent=2) + "\n")
        hf_io.write_safetensors(tmp / "model.safetensors", _state_dict(model), metadata={"format": "pt"})
        if peft_config(model) is not None:
            save_adapter(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)

    with disk_full_is_an_error(path, "model directory"):
        return write_dir(Path(path), fill)


def export_hf(model: GPT, path: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write a Hugging Face directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.
    LoRA/DoRA are merged into a copy of the weights first; bottleneck adapters have no HF form and are refused.
    Inside `disable_adapters(model)` the frozen base is exported."""
    path = Path(path)
    cfg_peft = peft_config(model)
    if cfg_peft is not None and adapters_enabled(model):
        if cfg_peft["method"] == "adapter":
            raise UserError("bottleneck adapters have no Hugging Face form; export the model in our format")
        import copy

        from llmstages.peft import merge_lora

        model = merge_lora(copy.deepcopy(model))
    cfg = model.config
    sd = {k: v.read() if isinstance(v, hf_io.Deferred) else v for k, v in _state_dict(model).items()}
    dtype = next(iter(sd.values())).dtype
    hf_cfg = hf_io.config_to_hf(cfg, dtype)

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_cfg.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_file(hf_io.to_hf_state_dict(sd, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)

    with disk_full_is_an_error(path, "export"):
        return write_dir(path, fill)
