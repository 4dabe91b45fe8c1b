"""Model directories: ours (`config.json` with our fields, `model.safetensors`, `tokenizer.json`) or a Hugging
Face one (`config.json` with `model_type`), told apart by their config and loaded the same way."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmstages.data.records import why_missing
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model.gpt import GPT, ModelConfig
from llmstages.outputs import disk_full_is_an_error, write_dir
from llmstages.peft import adapter_state_dict, adapters_enabled, peft_config
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


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    quantized: bool = True,
) -> GPT:
    """Our model with the weights of the directory `path` (ours or a Hugging Face one).

    The model is built on the meta device and the loaded tensors are assigned to it, so no memory is spent
    on a random initialisation. `dtype=None` keeps the dtype the weights were saved in; either way the model
    remembers it (`model.saved_dtype`), and saving writes the weights in it again. A QLoRA run's final model is
    its original base plus an adapter trained over that base in NF4: the base is quantized again, as it trained
    (`quantized=False`: held as saved, to merge the adapter into the original weights).
    """
    p, raw = check_model_dir(path)
    cfg = load_config(p)
    with torch.device("meta"):
        model = GPT(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    saved_dtype = hf_io.saved_float_dtype(p)
    tensors = hf_io.read_safetensors(p, dtype)  # each converted as it is read: no second copy of the model
    source = str(p / "model.safetensors")
    if "model_type" in raw:
        sd = hf_io.from_hf_state_dict(tensors, cfg, expected, source)
    else:
        sd = {}
        for name, shape in expected.items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            if name not in tensors:
                raise UserError(f"{source}: tensor '{name}' is missing")
            if tensors[name].shape != shape:
                raise UserError(
                    f"{source}: tensor '{name}' has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}"
                )
            sd[name] = tensors[name]
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise UserError(f"{source}: unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all)")
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.reset_rope(device)
    model = model.to(device)
    model.saved_dtype = saved_dtype  # save_model and export_hf write the weights back in it
    if (p / ADAPTER_CONFIG).is_file():  # a PEFT run's model directory: base weights plus the adapter
        load_adapter(model, p, quantized)
    return model


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.load(check_model_dir(path)[0])


def load_model_and_tokenizer(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer]:
    """The model and tokenizer of a directory, checked to fit together: every token id has an embedding row."""
    model, tok = load_model(path, device=device), load_tokenizer(path)
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{path}: the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size "
            f"{model.config.vocab_size} (tokenizer.json from another model?)"
        )
    return model, tok


def _state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The base model's tensors (PEFT tensors, if any, are saved apart by `save_adapter`), floating ones in the
    dtype the model was loaded from (`saved_dtype`; a model built here keeps its own)."""
    sd = {k: v for k, v in model.state_dict().items() if k not in adapter_state_dict(model)}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # safetensors refuses shared tensors; the tie is in the config
    dtype = getattr(model, "saved_dtype", None)
    return {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in sd.items()
    }


def save_model(model: GPT, path: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write our model directory atomically: a crash mid-write leaves any previous directory intact.
    A model with PEFT modules is written as its base weights plus `adapter.safetensors` / `adapter_config.json`."""

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps({FORMAT_KEY: 1, **model.config.to_dict()}, indent=2) + "\n")
        save_file(_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
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
    sd = _state_dict(model)
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
