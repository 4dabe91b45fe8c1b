"""`llmstages export`: a model directory written in another format: our directory with LoRA merged, the adapter in
the peft library's format, a transformers directory, or one GGUF file for llama.cpp."""

from __future__ import annotations

from pathlib import Path

from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.model.gpt import GPT
from llmstages.outputs import claim_file, claim_folder, disk_full_is_an_error, refuse_through_file
from llmstages.peft import merge_lora, peft_config
from llmstages.store.gguf import arch_of, export_gguf, pre_tokenizer_name
from llmstages.store.io import export_hf, load_model, load_tokenizer, resolve_model_path, save_model
from llmstages.store.peft import export_peft


def _is_export(path: Path) -> bool:
    """A folder `export` may replace with --force: a model directory or a PEFT adapter, and nothing else."""
    known = {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "adapter.safetensors",
        "adapter_config.json",
        "adapter_model.safetensors",
        "score_head.safetensors",
    }
    names = {p.name for p in path.iterdir()}
    return bool(names & {"config.json", "adapter_config.json"}) and names <= known


def export(
    model_path: str,
    out_path: str,
    fmt: str = "hf",
    dtype: str | None = None,
    force: bool = False,
    merge_base: str = "original",
) -> None:
    """`llmstages export`: the model directory `model_path` written at `out_path` as `fmt` (merged, peft, hf, gguf);
    everything is checked before anything is written, and only an earlier export is replaced (`force`). A QLoRA
    model's adapter is merged into its original base weights (`merge_base="original"`) or into the NF4 base it
    trained over ("nf4": the model that computes what training measured, in the saved precision)."""
    refuse_through_file(Path(out_path), "--out")
    if merge_base == "nf4" and fmt == "peft":
        raise UserError("--merge-base nf4 is for --format merged, hf or gguf (a peft export is the adapter alone)")
    model = load_model(model_path, dtype=None, quantized=merge_base == "nf4")
    tok = load_tokenizer(model_path)
    src, out = resolve_model_path(model_path).resolve(), Path(out_path).resolve()
    if out == src or src in out.parents or out in src.parents:
        raise UserError(f"--out {out_path} is the model being exported or holds it; write the export elsewhere")
    adapter = peft_config(model) or {}
    method = adapter.get("method")
    if merge_base == "nf4" and adapter.get("quantize_base") != "nf4":
        raise UserError(f"--merge-base nf4: {model_path} holds no adapter trained over an NF4 base (QLoRA)")
    if fmt == "gguf":
        _export_gguf(model_path, out_path, out, model, tok, dtype, force, method)
        return
    if dtype is not None:
        raise UserError("--dtype is for --format gguf; the other formats keep the model's dtype")
    claim_folder(out, "--out", _is_export, replace=force)
    if method == "adapter" and fmt == "merged":
        raise UserError("bottleneck adapters cannot be merged into the weights; use the model directory as is")
    with disk_full_is_an_error(out_path, "export"):  # the export is written whole or not at all
        if fmt == "hf":
            export_hf(model, out_path, tok)
        elif fmt == "peft":
            export_peft(model, out_path)
        else:
            save_model(merge_lora(model), out_path, tok)
    print(f"wrote {out_path}")


def _is_gguf(path: Path) -> bool:
    """An earlier GGUF export: the file starts with GGUF's magic."""
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _export_gguf(
    model_path: str,
    out_path: str,
    out: Path,
    model: GPT,
    tok: Tokenizer,
    dtype: str | None,
    force: bool,
    method: str | None,
) -> None:
    """One GGUF file at --out (`out`, resolved: a new name ending in .gguf, or with --force an earlier GGUF file)."""
    if out.suffix != ".gguf":
        raise UserError(f"--out {out_path}: a GGUF export is one file; give a name ending in .gguf")
    claim_file(out, "--out", _is_gguf)
    if out.exists() and not force:
        raise UserError(f"--out {out_path} already exists; pass --force to replace it")
    if method == "adapter":
        raise UserError("bottleneck adapters have no GGUF form; export a LoRA or a fully fine-tuned model")
    arch_of(model.config), pre_tokenizer_name(tok)  # refused here, before anything is written
    model = merge_lora(model) if method in ("lora", "dora") else model
    export_gguf(model, tok, out, dtype or "f16", name=Path(model_path).name)
    print(f"wrote {out_path} ({dtype or 'f16'}); run it with: llama-cli -m {out_path}")
