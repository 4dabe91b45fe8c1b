"""`llmstages <command> ...`: the command line. Bad input prints one line and exits with code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llmstages.errors import UserError


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from llmstages.model import generate, load_model, load_tokenizer

    device = _device(args.device)
    model = load_model(args.model, device=device)
    tok = load_tokenizer(args.model)
    ids = tok.encode(args.prompt, add_special_tokens=True)
    if not ids:
        raise UserError("--prompt is empty")
    context = model.config.block_size
    if len(ids) >= context:
        raise UserError(f"--prompt is {len(ids)} tokens, longer than the model's context of {context} tokens")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    eos = model.config.eos_ids or ([tok.eos_id] if tok.eos_id is not None else None)
    out = generate(
        model, [ids], max_new_tokens=min(args.max_new_tokens, context - len(ids)), temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, eos_id=eos, pad_id=tok.pad_id, generator=gen,
    )  # fmt: skip
    n = int(out.lengths[0])
    print(tok.decode(out.tokens[0, :n].tolist()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llmstages.model import export_hf, load_model, load_tokenizer

    model = load_model(args.model, dtype=None)
    tok = load_tokenizer(args.model)
    if args.format == "hf":
        export_hf(model, args.out, tok)
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from llmstages import __version__

    p = argparse.ArgumentParser(prog="llmstages", description=__doc__)
    p.add_argument("--version", action="version", version=f"llmstages {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="continue a prompt with a model directory")
    g.add_argument("--model", required=True, help="model directory (ours or a local Hugging Face one)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="write a model directory in another format")
    e.add_argument("--model", required=True, help="model directory")
    e.add_argument("--format", choices=["hf"], default="hf", help="hf: a transformers directory")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"llmstages: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmstages: interrupted", file=sys.stderr)
        return 130
