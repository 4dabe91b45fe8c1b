"""`llmstages <command> ...`: the command line. Bad input prints one line and exits with code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from llmstages.errors import UserError


def _sampling(args: argparse.Namespace):
    from llmstages.chat import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, args.device)


def cmd_generate(args: argparse.Namespace) -> int:
    from llmstages.chat import generate_text

    print(generate_text(args.model, args.prompt, _sampling(args)))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from llmstages.chat import chat

    return chat(args.model, _sampling(args), args.system)


def _sampling_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The options generate and chat share: the model and how to sample from it."""
    p.add_argument("--model", required=True, help="model directory, or a hub id in the local Hugging Face cache")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def cmd_export(args: argparse.Namespace) -> int:
    from llmstages.store.export import export

    export(args.model, args.out, args.format, args.dtype, args.force, args.merge_base)
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from llmstages.data.prepare import prepare_tokenizer

    prepare_tokenizer(args.out, args.data, args.vocab_size, args.tokenize, args.val_fraction, args.workers)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from llmstages.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, world_seed=args.world_seed)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from llmstages.eval.run import evaluate

    evaluate(
        args.model,
        args.labels,
        args.reference,
        args.reward,
        args.judge,
        args.data,
        args.perplexity,
        args.tasks,
        args.show,
        args.samples,
        args.temperature,
        args.max_new_tokens,
        args.seed,
        args.world_seed,
        args.out,
        args.device,
    )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:  # noqa: ARG001
    from llmstages import doctor

    return doctor.main()


def cmd_report(args: argparse.Namespace) -> int:
    from llmstages.report import check_target, write_report

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
    from llmstages.train.memory import estimate_run

    estimate_run(
        args.model,
        args.method,
        args.strategy,
        args.world_size,
        args.precision,
        args.batch_size,
        args.seq_len,
        args.activation_checkpointing,
        args.lora_rank,
        args.lora_targets,
        args.device,
        args.memory,
        args.measure,
        args.optimizer,
    )
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
    m.add_argument("--method", choices=["full", "lora", "qlora"], default="full", help="qlora: LoRA on an NF4 base")
    m.add_argument("--optimizer", choices=["adamw", "adamw8bit", "adamw4bit"], default="adamw")
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
    e.add_argument(
        "--merge-base",
        choices=["original", "nf4"],
        default="original",
        help="a QLoRA model: merge its adapter into the original base weights, or into the NF4 base it trained over",
    )
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
        from llmstages.outputs import is_disk_full
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
