"""`llmstages <command> ...`: the command line. Bad input prints one line and exits with code 2."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from llmstages.errors import UserError


def _device(name: str) -> str:
    from llmstages.train.loop import resolve_device

    return str(resolve_device(name, "--device"))


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from llmstages.model import load_model_and_tokenizer

    _check_sampling(args)
    device = _device(args.device)
    model, tok = load_model_and_tokenizer(args.model, device=device)
    ids = tok.encode(args.prompt, add_special_tokens=True)
    if not ids:
        raise UserError("--prompt is empty")
    context = model.config.block_size
    if len(ids) >= context:
        raise UserError(f"--prompt is {len(ids)} tokens, longer than the model's context of {context} tokens")
    out = _continue(model, tok, ids, args, torch.Generator(device=device).manual_seed(args.seed))
    n = int(out.lengths[0])
    print(tok.decode(out.tokens[0, :n].tolist()))
    return 0


def _continue(model, tok, ids: list[int], args: argparse.Namespace, gen, on_token=None):
    """One prompt continued as the sampling options say, up to the end of the context or an EOS of the model's."""
    from llmstages.model import generate

    eos = model.config.eos_ids or ([tok.eos_id] if tok.eos_id is not None else None)
    room = model.config.block_size - len(ids)
    return generate(
        model,
        [ids],
        min(args.max_new_tokens, room),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=eos,
        pad_id=tok.pad_id,
        generator=gen,
        on_token=on_token,
    )


def _sampling_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The options generate and chat share: the model and how to sample from it."""
    p.add_argument("--model", required=True, help="model directory, or a hub id in the local Hugging Face cache")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def _check_temperature(t: float) -> None:
    if not math.isfinite(t):
        raise UserError(f"--temperature must be a finite number >= 0 (0 is greedy), got {t}")
    if t < 0:
        raise UserError(f"--temperature must be >= 0 (0 is greedy), got {t}")


def _check_sampling(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    _check_temperature(args.temperature)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")


class _Streamed:
    """A reply printed as its tokens arrive: the whole reply is decoded each time and the new part printed, so a
    character split over several tokens comes out whole."""

    def __init__(self, tok) -> None:
        self.tok, self.ids, self.shown = tok, [], ""

    def __call__(self, tokens) -> None:
        self.ids.append(int(tokens[0]))
        now = self.tok.decode(self.ids)
        print(now[len(self.shown) :], end="", flush=True)
        self.shown = now


CHAT_COMMANDS = {"/reset": "start the conversation over", "/exit": "end the chat (so does end of input)"}


def _read_turn(n: int) -> str:
    """Line `n` of stdin ("" at its end); bytes that are not UTF-8 text, or NUL bytes, are an error."""
    try:
        line = sys.stdin.readline()
        line.encode("utf-8")  # a stdin decoding with surrogateescape passes undecodable bytes on as surrogates
    except UnicodeError:
        raise UserError(f"stdin: not UTF-8 text at or near line {n} (binary input?)") from None
    if "\x00" in line:
        raise UserError(f"stdin: line {n} holds NUL bytes (binary input?)")
    return line


def cmd_chat(args: argparse.Namespace) -> int:
    """A multi-turn chat through the model's chat template, replies streamed as they are generated. Reads one
    user turn a line from stdin (a terminal or a pipe); /reset forgets the conversation, /exit (or end of input)
    ends it; any other line starting with / is an unknown command, never sent to the model."""
    import torch

    from llmstages.data.chat import prompt_ids
    from llmstages.model import load_model_and_tokenizer

    _check_sampling(args)
    device = _device(args.device)
    model, tok = load_model_and_tokenizer(args.model, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    system = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chat with {args.model}: type a message; /reset starts over, /exit (or Ctrl-D) ends")
    history: list[dict[str, str]] = []
    n = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        n += 1
        line = _read_turn(n)
        text = line.strip()
        command = text.split()[0] if text.startswith("/") else None
        if not line or command == "/exit":
            return 0
        if command == "/reset":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        if command is not None:
            known = "; ".join(f"{c}: {what}" for c, what in CHAT_COMMANDS.items())
            print(f"(unknown command {command}, not sent to the model; commands: {known})", flush=True)
            continue
        if not text:
            continue
        turn = [{"role": "user", "content": text}]
        ids = prompt_ids(system + history + turn, tok)
        room = model.config.block_size - len(ids)
        if room < 1:
            print(f"(the conversation fills the model's context of {model.config.block_size} tokens; /reset)")
            continue
        reply = _Streamed(tok)
        _continue(model, tok, ids, args, gen, on_token=reply)
        print(flush=True)
        history += [*turn, {"role": "assistant", "content": tok.decode(reply.ids).strip()}]


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


def cmd_export(args: argparse.Namespace) -> int:
    from llmstages.model import export_hf, load_model, load_tokenizer, save_model
    from llmstages.model.io import disk_full_is_an_error, resolve_model_path
    from llmstages.outputs import claim_folder, refuse_through_file
    from llmstages.peft import merge_lora, peft_config
    from llmstages.peft.export import export_peft

    refuse_through_file(Path(args.out), "--out")
    model = load_model(args.model, dtype=None)
    tok = load_tokenizer(args.model)
    src, out = resolve_model_path(args.model).resolve(), Path(args.out).resolve()
    if out == src or src in out.parents or out in src.parents:
        raise UserError(f"--out {args.out} is the model being exported or holds it; write the export elsewhere")
    method = (peft_config(model) or {}).get("method")
    if args.format == "gguf":
        return _export_gguf(args, model, tok, out, method)
    if args.dtype is not None:
        raise UserError("--dtype is for --format gguf; the other formats keep the model's dtype")
    claim_folder(out, "--out", _is_export, replace=args.force)
    if method == "adapter" and args.format == "merged":
        raise UserError("bottleneck adapters cannot be merged into the weights; use the model directory as is")
    with disk_full_is_an_error(args.out, "export"):  # the export is written whole or not at all
        if args.format == "hf":
            export_hf(model, args.out, tok)
        elif args.format == "peft":
            export_peft(model, args.out)
        else:
            save_model(merge_lora(model), args.out, tok)
    print(f"wrote {args.out}")
    return 0


def _is_gguf(path: Path) -> bool:
    """An earlier GGUF export: the file starts with GGUF's magic."""
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _export_gguf(args: argparse.Namespace, model, tok, out: Path, method: str | None) -> int:
    """One GGUF file at --out (a new name ending in .gguf, or with --force an earlier GGUF file)."""
    from llmstages.model.gguf_export import arch_of, export_gguf, pre_tokenizer_name
    from llmstages.outputs import claim_file
    from llmstages.peft import merge_lora

    if out.suffix != ".gguf":
        raise UserError(f"--out {args.out}: a GGUF export is one file; give a name ending in .gguf")
    claim_file(out, "--out", _is_gguf)
    if out.exists() and not args.force:
        raise UserError(f"--out {args.out} already exists; pass --force to replace it")
    if method == "adapter":
        raise UserError("bottleneck adapters have no GGUF form; export a LoRA or a fully fine-tuned model")
    arch_of(model.config), pre_tokenizer_name(tok)  # refused here, before anything is written
    model = merge_lora(model) if method in ("lora", "dora") else model
    export_gguf(model, tok, out, args.dtype or "f16", name=Path(args.model).name)
    print(f"wrote {args.out} ({args.dtype or 'f16'}); run it with: llama-cli -m {args.out}")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from llmstages.data.builtin import builtin_corpus
    from llmstages.data.tasks import answer_lines
    from llmstages.data.text import iter_documents, prepare_shards
    from llmstages.data.tokenizer import train_bpe
    from llmstages.model.io import disk_full_is_an_error
    from llmstages.outputs import claim_folder, refuse_through_file, write_dir

    if args.vocab_size < 300:
        raise UserError(f"--vocab-size must be at least 300 (256 bytes plus merges), got {args.vocab_size}")
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    out = Path(args.out)
    refuse_through_file(out, "--out")
    ours = {"tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin", "meta.json"}
    claim_folder(out, "--out", lambda p: {q.name for q in p.iterdir()} <= ours and (p / "tokenizer.json").is_file())
    docs = list(iter_documents(args.data)) if args.data else builtin_corpus()
    if not any(d.strip() for d in docs):
        raise UserError("the data holds no text")
    tok = train_bpe(docs if args.data else [*docs, *answer_lines()], args.vocab_size)
    meta: dict = {}

    def fill(tmp: Path) -> None:  # the tokenizer and its shards land together, or not at all
        tok.save(tmp)
        if args.tokenize:
            meta.update(
                prepare_shards(
                    docs, tok, tmp, args.val_fraction, workers=args.workers, source=",".join(args.data) or "builtin"
                )
            )

    with disk_full_is_an_error(out, "tokenizer folder"):  # written whole or not at all
        write_dir(out, fill)
    print(f"tokenizer: {tok.vocab_size} tokens, written to {out}")
    if meta:
        print(f"shards: {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens in {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from llmstages.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, world_seed=args.world_seed)
    return 0


def _is_eval_json(path: Path) -> bool:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"model", "reference"} <= set(data)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from llmstages.eval.policy import evaluate_dir, label_agreement

    if args.samples < 1:
        raise UserError(f"--samples must be at least 1, got {args.samples}")
    _check_temperature(args.temperature)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.out:
        from llmstages.outputs import claim_file

        claim_file(Path(args.out), "--out", _is_eval_json)
    if not args.model and not args.labels:
        raise UserError("give --model (a model to judge) or --labels (a preference file to check), or both")
    wants_lm = args.perplexity is not None or args.tasks is not None or args.show
    if wants_lm and not args.model:
        raise UserError("--perplexity, --tasks and --show judge a model: give --model")
    result = label_agreement(args.labels, args.reward, args.world_seed) if args.labels else {}
    if args.model and wants_lm:
        from llmstages.data.text import iter_documents
        from llmstages.eval import lm
        from llmstages.model import load_model, load_tokenizer

        model, tok = load_model(args.model, device=_device(args.device)).eval(), load_tokenizer(args.model)
        if args.perplexity is not None:
            docs = (
                list(iter_documents(args.perplexity)) if args.perplexity else lm.builtin_heldout_text(args.world_seed)
            )
            result.update(lm.perplexity(model, tok, docs))
        if args.tasks is not None:
            result.update(lm.task_accuracy(model, tok, args.tasks, args.world_seed))
        if args.show:
            questions = lm.heldout_questions(args.show, args.world_seed)
            for q, a in zip(questions, lm.show(model, tok, questions)):
                print(f"{q!r} -> {a!r}")
    if args.model and (not wants_lm or args.reference or args.judge):
        result.update(
            evaluate_dir(
                args.model,
                args.reference,
                args.reward,
                args.data,
                args.samples,
                args.temperature,
                args.max_new_tokens,
                args.seed,
                _device(args.device),
                args.judge,
                args.world_seed,
            )
        )
    if not result:
        return 0
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4g}")
    if args.out:
        from llmstages.outputs import write_file

        write_file(Path(args.out), json.dumps({"model": args.model, "reference": args.reference, **result}, indent=1))
        print(f"wrote {args.out}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:  # noqa: ARG001
    from llmstages import doctor

    return doctor.main()


def cmd_report(args: argparse.Namespace) -> int:
    from llmstages.monitor.report import check_target, write_report

    check_target(args.runs, args.out)
    print(f"wrote {write_report(args.runs, args.out)}")
    return 0


def cmd_cai(args: argparse.Namespace) -> int:
    from llmstages.config import CAIConfig, load_config
    from llmstages.stages import constitutional

    cfg = load_config(CAIConfig, args.config, args.overrides)
    {"revise": constitutional.main_revise, "label": constitutional.main_label, "run": constitutional.main_run}[
        args.action
    ](cfg)
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    from llmstages.frontier import run_frontier, table

    rows = run_frontier(args.sft, args.out, args.dpo_betas, args.ppo_kl, args.overrides, args.samples)
    print(table(rows), end="")
    print(f"wrote {args.out}/frontier.json, frontier.md and frontier.png")
    return 0


def cmd_estimate_memory(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmstages.model import PRESETS, load_config, preset
    from llmstages.train import memory

    if args.seq_len is not None and args.seq_len < 1:
        raise UserError(f"--seq-len must be at least 1, got {args.seq_len}")
    if args.lora_rank < 1:
        raise UserError(f"--lora-rank must be at least 1, got {args.lora_rank}")
    if args.model in PRESETS:
        cfg = preset(args.model)
    elif Path(args.model).exists() or "/" in args.model:  # a folder, or a hub id in the local cache
        cfg = load_config(args.model)
    else:
        raise UserError(f"--model '{args.model}' is neither a preset ({', '.join(PRESETS)}) nor a model directory")
    seq = cfg.block_size if args.seq_len is None else args.seq_len
    kw = dict(
        method=args.method,
        strategy=args.strategy,
        world=args.world_size,
        precision=args.precision,
        seq=seq,
        checkpointing=args.activation_checkpointing,
        lora_rank=args.lora_rank,
        lora_targets=args.lora_targets,
        device="cpu" if args.measure else args.device,
    )
    e = memory.estimate(cfg, batch=args.batch_size, **kw)
    ckpt = ", activation checkpointing" if args.activation_checkpointing else ""
    print(
        memory.report(
            e,
            f"{args.model}: {args.method}, {args.strategy} on {args.world_size} process(es), "
            f"{args.precision}, batch {args.batch_size} x {seq} tokens{ckpt}",
        )
    )
    if args.memory:
        budget = memory.parse_size(args.memory)
        fits = memory.largest_batch(cfg, budget, **kw)
        print(f"  largest batch in {memory.gib(budget)}: {fits}" + ("" if fits else " (does not fit at batch 1)"))
    if args.measure:
        if args.strategy != "none" or args.world_size != 1:
            raise UserError("--measure runs one process: use --strategy none --world-size 1")
        m = memory.measure(
            cfg,
            args.method,
            args.precision,
            args.batch_size,
            seq,
            args.activation_checkpointing,
            args.lora_rank,
            args.lora_targets,
        )
        print(f"  measured peak    {memory.gib(m):>12}  (estimate / measured = {e.total / m:.2f})")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from llmstages.stages import STAGES
    from llmstages.train import distributed

    overrides = [*args.overrides, *([f"train.profile_steps={args.profile}"] if args.profile else [])]
    stage = STAGES[args.command]
    cfg = stage.load(args.config, overrides)
    if getattr(args, "show_example", None) is not None:
        from llmstages.stages.sft import show_example

        print(show_example(cfg, args.show_example))
        return 0
    stage.main(cfg, progress=int(os.environ.get("RANK", "0")) == 0)  # under torchrun rank 0 reports
    distributed.shutdown()
    return 0


def _add_stage(sub, name: str) -> argparse.ArgumentParser:
    from llmstages.stages import STAGES

    help = STAGES[name].help
    s = sub.add_parser(name, help=help, description=f"{help}. Settings come from --config and key.sub=value overrides.")
    s.add_argument("--config", help="YAML recipe (see configs/)")
    s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a recipe key, e.g. train.lr=3e-4")
    s.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="record N steps with torch.profiler (into profile/) and print the top operators",
    )
    s.set_defaults(func=cmd_stage)
    return s


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (a missing or unknown option, a value of the wrong type) are the one line every other
    bad input gets, exit code 2, instead of the usage text and a line in another form."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("llmstages").strip()
        where = f"{command}: " if command else ""
        print(f"llmstages: error: {where}{message} (see llmstages {command or ''} --help)".replace("  ", " "),
              file=sys.stderr)  # fmt: skip
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from llmstages import __version__

    p = _Parser(prog="llmstages", description=__doc__)
    p.add_argument("--version", action="version", version=f"llmstages {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run the pipeline end to end on the built-in world (the main job)")
    d.add_argument("--out", default="runs/demo", help="run directory (reused: finished stages are skipped)")
    d.add_argument("--quick", action="store_true", help="a much shorter run, for tests")
    d.add_argument("--seed", type=int, default=0, help="the runs' seed: initialisation, data order, sampling")
    d.add_argument("--world-seed", type=int, default=0, help="the built-in world: its facts, corpus and splits")
    d.set_defaults(func=cmd_demo)

    from llmstages.stages import TRAINING

    parsers = {name: _add_stage(sub, name) for name in TRAINING}
    parsers["sft"].add_argument(
        "--show-example", type=int, metavar="N", help="print example N with its loss mask and exit"
    )

    c = sub.add_parser(
        "cai",
        help="Constitutional AI: critique-and-revise SFT data, AI-feedback labels, the loop",
        description="Constitutional AI (Bai et al. 2022). revise: responses, critiques and revisions "
        "-> SFT data; label: response pairs judged by the feedback model -> preference data; run: "
        "revise -> SFT -> label -> DPO (or RM + PPO).",
    )
    actions = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help in (
        ("revise", "responses -> critiques -> revisions, written as SFT data"),
        ("label", "pairs of responses -> the feedback model's preference, written as pairs"),
        ("run", "the whole loop: revise -> SFT -> label -> DPO (or RM + PPO)"),
    ):
        a = actions.add_parser(action, help=help)
        a.add_argument("--config", help="YAML recipe (see configs/cai/)")
        a.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a recipe key")
        a.set_defaults(func=cmd_cai)

    t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer (and optionally tokenize the data)")
    t.add_argument("--data", nargs="*", default=[], help="files or folders (.txt, .jsonl, .json); none: built-in")
    t.add_argument("--vocab-size", type=int, default=2048)
    t.add_argument("--out", required=True, help="directory for tokenizer.json")
    t.add_argument("--tokenize", action="store_true", help="also write token shards (train.bin, val.bin) to --out")
    t.add_argument("--val-fraction", type=float, default=0.05)
    t.add_argument("--workers", type=int, default=2)
    t.set_defaults(func=cmd_tokenizer)

    g = sub.add_parser("generate", help="continue a prompt with a model directory")
    g.add_argument("--prompt", required=True)
    _sampling_options(g, max_new_tokens=64)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk to a chat model through its chat template (stdin: a terminal or a pipe)")
    c.add_argument("--system", default=None, help="a system message that opens the conversation")
    _sampling_options(c, max_new_tokens=256)
    c.set_defaults(func=cmd_chat)

    v = sub.add_parser("eval", help="judge a model on held-out prompts: reward, win rate and KL against a reference")
    v.add_argument("--model", help="model directory to judge")
    v.add_argument("--labels", nargs="*", default=[], help="preference files whose labels are checked against --reward")
    v.add_argument("--reference", help="model directory to compare with (win rate, KL), e.g. the SFT model")
    v.add_argument(
        "--reward",
        default="llmstages.data.oracle:oracle_reward",
        help="module:function, or a reward-model directory (default: the built-in oracle)",
    )
    v.add_argument(
        "--judge",
        help="a reward-model directory (or module:function) whose ordering of pairs of the "
        "model's replies is checked against --reward (judge_accuracy)",
    )
    v.add_argument("--data", nargs="*", default=[], help="prompt files; none: built-in held-out questions")
    v.add_argument(
        "--perplexity",
        nargs="*",
        metavar="FILE",
        help="perplexity on text files (.txt/.jsonl); no file: the built-in corpus's held-out documents",
    )
    v.add_argument(
        "--tasks",
        nargs="*",
        metavar="FILE",
        help="exact match on SFT files' last assistant turns; no file: the built-in tasks about the held-out people",
    )
    v.add_argument(
        "--show", type=int, default=0, metavar="N", help="print the model's greedy answers to N held-out questions"
    )
    v.add_argument("--samples", type=int, default=4, help="replies per prompt")
    v.add_argument("--temperature", type=float, default=1.0)
    v.add_argument("--max-new-tokens", type=int, default=8)
    v.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    v.add_argument(
        "--world-seed",
        type=int,
        default=0,
        help="the built-in world whose held-out questions are asked and which the oracle judges (the run's world_seed)",
    )
    v.add_argument("--out", help="also write the figures to this JSON file")
    v.add_argument("--device", default="auto")
    v.set_defaults(func=cmd_eval)

    o = sub.add_parser(
        "doctor", help="the environment (torch, device, bf16, CUDA/NCCL, memory, disk) and likely problems"
    )
    o.set_defaults(func=cmd_doctor)

    r = sub.add_parser("report", help="report.html with plots, held-out metrics and samples of one or more runs")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a demo directory or stage runs; several are compared")
    r.add_argument("--out", help="where to write the HTML (default: RUN_DIR/report.html of the first)")
    r.set_defaults(func=cmd_report)

    f = sub.add_parser("frontier", help="reward-KL frontier: DPO at several betas, PPO at several KL coefficients")
    f.add_argument("--sft", required=True, help="the SFT model directory (start and reference of every run)")
    f.add_argument("--out", default="runs/frontier")
    f.add_argument("--dpo-betas", type=float, nargs="*", default=[0.1, 0.5, 2.0])
    f.add_argument("--ppo-kl", type=float, nargs="*", default=[0.05, 0.5, 2.0])
    f.add_argument("--samples", type=int, default=4, help="replies per held-out prompt in each evaluation")
    f.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="applied to every DPO and PPO run; dpo:key=value or ppo:key=value to one kind",
    )
    f.set_defaults(func=cmd_frontier)

    m = sub.add_parser("estimate-memory", help="memory per process of a training run, and the largest batch that fits")
    m.add_argument("--model", required=True, help="a preset (e.g. llama3_8b) or a model directory")
    m.add_argument("--method", choices=["full", "lora"], default="full")
    m.add_argument("--strategy", default="none", help="none, ddp, zero1, fsdp (ZeRO-3), fsdp-zero2, tp or pp")
    m.add_argument("--world-size", type=int, default=1)
    m.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    m.add_argument("--batch-size", type=int, default=1, help="sequences per process")
    m.add_argument("--seq-len", type=int, default=None, help="default: the model's context")
    m.add_argument("--activation-checkpointing", action="store_true")
    m.add_argument("--lora-rank", type=int, default=8)
    m.add_argument("--lora-targets", nargs="*", default=["q_proj", "v_proj"])
    m.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where the run trains (runtime memory)")
    m.add_argument("--memory", help="also print the largest batch that fits in this much, e.g. 80GiB")
    m.add_argument("--measure", action="store_true", help="run 3 steps on this CPU and print the measured peak")
    m.set_defaults(func=cmd_estimate_memory)

    e = sub.add_parser("export", help="write a model directory in another format")
    e.add_argument("--model", required=True, help="model directory")
    e.add_argument(
        "--format",
        choices=["merged", "peft", "hf", "gguf"],
        default="hf",
        help="merged: our directory with LoRA folded into the weights; peft: the adapter in the peft "
        "library's format; hf: a transformers directory (LoRA merged); gguf: one file for llama.cpp / Ollama",
    )
    e.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default=None, help="gguf only: weight type (f16)")
    e.add_argument(
        "--out", required=True, help="a new or empty folder (gguf: a .gguf file), or with --force an earlier export"
    )
    e.add_argument("--force", action="store_true", help="replace --out when it is a model directory (never a run)")
    e.set_defaults(func=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version (0), or the one-line error of _Parser (2)
        return e.code if isinstance(e.code, int) else 2
    where = f" (rank {os.environ['RANK']})" if "RANK" in os.environ and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    try:
        return args.func(args)
    except UserError as e:
        print(f"llmstages: error{where}: {e}", file=sys.stderr)
        _leave_group()
        return 2
    except KeyboardInterrupt:
        print(f"llmstages: interrupted{where}", file=sys.stderr)
        _leave_group()
        return 130
    except Exception as e:
        from llmstages.model.io import is_disk_full
        from llmstages.train.loop import Interrupted, TrainingFailed

        if isinstance(e, Interrupted):
            print(f"llmstages{where}: {e}", file=sys.stderr)
            _leave_group()
            return 130
        if isinstance(e, TrainingFailed):  # the run stopped training (a NaN/Inf loss or weights): one line, exit 1
            print(f"llmstages: error{where}: {e}", file=sys.stderr)
            _leave_group()
            return 1
        if is_disk_full(e):  # a write outside the guarded saves (metrics, a report): one line, what was written stays
            print(f"llmstages: error{where}: no space left on device ({e})", file=sys.stderr)
            _leave_group()
            return 2
        if where:  # one line that names the rank, then the traceback; the launcher stops the other ranks
            print(f"llmstages: error{where}: {type(e).__name__}: {e}", file=sys.stderr)
            _leave_group()
        raise


def _leave_group() -> None:
    """After an error under torchrun: leave the process group without waiting for the other ranks."""
    if "torch.distributed" in sys.modules:
        from llmstages.train import distributed

        distributed.abort()
