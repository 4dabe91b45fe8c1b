"""Stage 2, supervised fine-tuning: train on assistant replies only, fully or with LoRA / DoRA / adapters.

    llmstages sft --config configs/sft/lora.yaml [peft.rank=16 train.max_steps=200 ...]
    llmstages sft --config configs/sft/lora.yaml --show-example 0    # one rendered example and its loss mask

setup: load the base model (ours or a Hugging Face directory), render and tokenize the conversations (built-in
       tasks or the user's files), check lengths; nothing is written until all of that has passed.
main:  apply PEFT from outside, run the shared loop with the language-model loss on masked labels, evaluate
       held-out accuracy (first clause) and exact match at every eval step, and write `out_dir/final` (base +
       adapter for PEFT runs).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llmstages.config import SFTConfig, to_dict
from llmstages.data.chat import (
    Example,
    fit_length,
    packed_batch,
    padded_batch,
    read_conversations,
    tokenize_conversation,
)
from llmstages.data.lengths import Tally
from llmstages.data.tasks import Task, builtin_tasks
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.eval.lm import EvalItem, builtin_items, conversation_item, exact_match, fit_items
from llmstages.losses import IGNORE_INDEX, count_targets, lm_loss
from llmstages.model import GPT, flops_per_token
from llmstages.peft import prepare_policy, trainable_parameters
from llmstages.store import load_model_and_tokenizer, load_tokenizer, save_model
from llmstages.train.frozen import base_weights
from llmstages.train.loop import EpochSampler, Trainer, fit
from llmstages.train.prepare import prepare_model
from llmstages.train.start import prepare_run_dir, start_run


@dataclass
class Setup:
    out: Path
    device: torch.device
    model: GPT
    tokenizer: Tokenizer
    train: list[Example]
    val: list[Example]
    eval_items: list[EvalItem]
    eval_new_tokens: int
    """New tokens generated for each held-out prompt (its answer + 2, fewer only where the context is short)."""
    fit: Tally
    """Training examples cut or dropped to fit train.seq_len + 1 tokens (data/lengths.py)."""
    eval_note: str | None
    """What setup changed to fit the held-out prompts in the model's context (None: nothing), printed once."""


def _examples(cfg: SFTConfig, tok: Tokenizer):
    """(train examples, val examples, exact-match items) from the built-in tasks or the user's files."""
    render = lambda msgs, where: tokenize_conversation(msgs, tok, cfg.data.train_on_prompt, where)  # noqa: E731
    if not cfg.data.path:
        tasks = builtin_tasks(cfg.world_seed, cfg.data.heldout_people, styles=cfg.data.styles)
        train = [render(t.messages(), f"builtin:{i}") for i, t in enumerate(tasks["train"])]
        held: list[Task] = tasks["heldout"]
        val = [render(t.messages(), f"builtin-heldout:{i}") for i, t in enumerate(held)]
        return train, val, builtin_items(tok, held)
    train = [render(m, where) for where, m in read_conversations(cfg.data.path, cfg.data.columns)]
    val, items = [], []
    if cfg.data.val_path:
        for where, msgs in read_conversations(cfg.data.val_path, cfg.data.columns):
            val.append(render(msgs, where))
            items.append(conversation_item(tok, msgs))
    return train, val, items


def setup(cfg: SFTConfig) -> Setup:
    out = Path(cfg.out_dir)
    device, _ = start_run(cfg.run_args("sft"))
    if not cfg.model.path:
        raise UserError("set model.path to the model directory to fine-tune (ours or a Hugging Face one)")
    torch.manual_seed(cfg.seed)
    model, tok = load_model_and_tokenizer(cfg.model.path, quantize_base=cfg.peft.quantize_base)
    if tok.eos_id is None:
        raise UserError(f"{cfg.model.path}: the tokenizer has no EOS token; SFT trains the EOS that ends a reply")
    if cfg.train.seq_len > model.config.block_size:
        raise UserError(
            f"train.seq_len={cfg.train.seq_len} is above the model's context of {model.config.block_size} tokens"
        )
    train, val, items = _examples(cfg, tok)
    train, fit = fit_length(train, cfg.train.seq_len, cfg.data.truncate, cfg.data.max_dropped)  # too long: cut
    val, _ = fit_length(val, cfg.train.seq_len, truncate=True, max_dropped=cfg.data.max_dropped)
    if not train:
        raise UserError("no SFT example left to train on")
    items, new_tokens, note = items[: cfg.data.max_eval_examples], 0, None
    if items:  # the evaluation generates within the model's context: fitted (or refused) now, not at step 0
        items, gen = fit_items(items, tok, model.config.block_size)
        new_tokens, note = gen.max_new_tokens, gen.note(model.config.block_size)
    prepare_policy(model, cfg.peft.method, **cfg.peft.options())  # a LoRA the model carries is merged first
    return Setup(out, device, model, tok, train, val, items, new_tokens, fit, note)


def show_example(cfg: SFTConfig, index: int) -> str:
    """One rendered training example, each token with whether it is trained (the loss mask made visible)."""
    tok = load_tokenizer(cfg.model.path)
    train, _, _ = _examples(cfg, tok)
    if not 0 <= index < len(train):
        raise UserError(f"--show-example {index}: there are {len(train)} examples")
    ex = train[index]
    lines = [f"example {index} ({ex.where}), {len(ex.input_ids)} tokens; [trained] tokens in brackets:"]
    pieces = [
        (f"[{tok.decode([t], False)}]" if lab != IGNORE_INDEX else tok.decode([t], False))
        for t, lab in zip(ex.input_ids, ex.labels)
    ]
    lines.append("".join(pieces))
    return "\n".join(lines)


def main(cfg: SFTConfig, progress: bool = True) -> dict[str, float]:
    s = setup(cfg)
    args = cfg.train
    prepare_run_dir(cfg.run_args("sft"), to_dict(cfg), s.model)
    pad = s.tokenizer.pad_id
    sampler = EpochSampler(len(s.train), args.batch_size, args.grad_accum, cfg.seed)

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(s.device) for k, v in batch.items()}

    def batches(start: int) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The grad_accum micro-batches of each step: shuffled examples, packed or padded."""
        for step in itertools.count(start):
            drawn = [[s.train[i] for i in sampler(step, m)] for m in range(args.grad_accum)]
            yield [to_device(packed_batch(e, args.seq_len, pad) if cfg.data.packing else padded_batch(e, pad))
                   for e in drawn]  # fmt: skip

    def evaluate(m: GPT) -> dict[str, float]:
        result: dict[str, float] = {}
        if s.val:
            total, count = 0.0, 0
            for i in range(0, len(s.val), args.batch_size):
                b = to_device(padded_batch(s.val[i : i + args.batch_size], pad))
                loss, _ = lm_loss(m, b)
                total, count = total + float(loss), count + count_targets(b)
            result.update(val_loss=total / count, val_ppl=math.exp(total / count))
        result.update(exact_match(m, s.tokenizer, s.eval_items, max_new_tokens=s.eval_new_tokens))
        return result

    model = prepare_model(s.model.to(s.device), args, frozen_source=functools.partial(base_weights, cfg.model.path))
    trainer = Trainer(model, args, s.out, device=s.device)
    trainable, total = trainable_parameters(s.model)
    if progress:
        print(
            f"sft: {len(s.train)} examples ({s.fit.summary()}), {len(s.eval_items)} held-out prompts; "
            f"peft {cfg.peft.method}{' on an NF4 base' if cfg.peft.quantize_base == 'nf4' else ''}: "
            f"{trainable:,} of {total:,} parameters trainable "
            f"({trainable / total:.2%})"
        )
        if s.eval_note:
            print(f"sft: {s.eval_note}")
    start = {"trainable_parameters": trainable, "parameters": total, **s.fit.metrics()}
    result = fit(
        trainer,
        batches,
        lm_loss,
        count_targets,
        evaluate=evaluate,
        first_record=lambda: {**start, **evaluate(s.model)},
        save_final=lambda final: save_model(final, s.out / "final", s.tokenizer),
        resume=cfg.resume,
        monitor=cfg.monitor,
        flops_per_token=flops_per_token(s.model.config, args.seq_len),
        progress=progress,
    )
    if progress:
        acc = result.get("task_accuracy")
        print(f"sft: done; final model in {s.out / 'final'}" + (f", held-out accuracy {acc:.1%}" if acc else ""))
    return result
