"""Stage 1, pre-training: next-token prediction on raw text.

    llmstages pretrain --config configs/pretrain/tiny.yaml [train.max_steps=200 ...]

setup: validate the config, pick the tokenizer (given, the model's, or trained here), size the model, check
       the data; nothing is written until all of that has passed.
main:  tokenize the corpus into shards, then run the shared loop with the language-model loss, validating on
       held-out documents, and write `out_dir/final` (a model directory).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmstages.config import PretrainConfig, to_dict
from llmstages.data.builtin import World, builtin_corpus
from llmstages.data.tasks import answer_lines
from llmstages.data.text import (
    META,
    TokenShards,
    iter_documents,
    prepare_shards,
    tokenizer_hash,
    unigram_entropy,
    val_picker,
)
from llmstages.data.tokenizer import Tokenizer, train_bpe
from llmstages.errors import UserError
from llmstages.eval.facts import fact_recall
from llmstages.losses import count_targets
from llmstages.model import GPT, flops_per_token, num_params, preset
from llmstages.store import load_model, load_tokenizer, save_model
from llmstages.train import distributed
from llmstages.train.loop import Trainer, fit
from llmstages.train.prepare import prepare_model
from llmstages.train.start import prepare_run_dir, start_run

SHARD_VERSION = 2
VAL_KEY = 2**31 - 1  # the "step" of validation batches in the sampling key


@dataclass
class Setup:
    cfg: PretrainConfig
    out: Path
    device: torch.device
    tokenizer: Tokenizer
    train_tokenizer: bool
    model: GPT
    documents: list[str] | None
    """Documents to tokenize (None when the data is already a shard folder)."""
    shards_dir: Path
    resume_from: Path | None


def _documents(cfg: PretrainConfig) -> list[str] | None:
    """The corpus as documents, or None when `data.path` is one folder of token shards."""
    paths = cfg.data.path
    if len(paths) == 1 and (Path(paths[0]) / META).is_file():
        return None
    if not paths:
        return builtin_corpus(cfg.world_seed, cfg.data.builtin_size_mb)
    docs = [d for d in iter_documents(paths, cfg.data.columns) if d.strip()]
    if not docs:
        raise UserError(f"data.path {paths}: no non-empty documents")
    return docs


def _tokenizer(cfg: PretrainConfig, out: Path, documents: list[str] | None) -> tuple[Tokenizer, bool]:
    """(tokenizer, trained_here). Order: data.tokenizer, model.path, the run's own, the shard folder, train one."""
    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer), False
    if cfg.model.path:
        return load_tokenizer(cfg.model.path), False
    if (out / "tokenizer" / "tokenizer.json").is_file() and cfg.resume:
        return Tokenizer.load(out / "tokenizer"), False
    if documents is None:
        shard_dir = Path(cfg.data.path[0])
        if (shard_dir / "tokenizer.json").is_file():
            return Tokenizer.load(shard_dir), False
        raise UserError(f"{shard_dir}: token shards without tokenizer.json; set data.tokenizer")
    d = distributed.current()  # under torchrun rank 0 trains the BPE and the other ranks receive it
    texts = documents if cfg.data.path else [*documents, *answer_lines()]  # the built-in judging answers: one token
    tok = train_bpe(texts, cfg.data.vocab_size) if d.is_main else None
    spec = d.share_from_main(tok.to_spec() if tok is not None else None)
    return (tok if tok is not None else Tokenizer.from_spec(spec)), True


def _model(cfg: PretrainConfig, tok: Tokenizer) -> GPT:
    fields = dict(cfg.model.fields)
    if cfg.model.path:
        unsupported = set(fields) - {"dropout"}
        if unsupported:
            raise UserError(f"model.path is set: model.{sorted(unsupported)[0]} cannot change a loaded model")
        model = load_model(cfg.model.path)
        model.config.dropout = fields.get("dropout", model.config.dropout)
        return model
    if not cfg.model.preset:
        raise UserError("set model.preset (e.g. llama_tiny) or model.path")
    fields.setdefault("vocab_size", 64 * math.ceil(tok.vocab_size / 64))
    for name, tid in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id), ("pad_token_id", tok.pad_id)):
        fields.setdefault(name, tid)
    return GPT(preset(cfg.model.preset, **fields))


def setup(cfg: PretrainConfig) -> Setup:
    """Everything that can fail on bad input, before anything is written to `out_dir`."""
    out = Path(cfg.out_dir)
    device, existing = start_run(cfg.run_args("pretrain"))
    torch.manual_seed(cfg.seed)
    documents = _documents(cfg)
    tok, trained = _tokenizer(cfg, out, documents)
    model = _model(cfg, tok)
    if cfg.train.seq_len > model.config.block_size:
        raise UserError(
            f"train.seq_len={cfg.train.seq_len} is above the model's context of {model.config.block_size} tokens "
            "(model.block_size)"
        )
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} tokens, more than model.vocab_size={model.config.vocab_size}"
        )
    shards_dir = out / "data" if documents is not None else Path(cfg.data.path[0])
    if documents is None:
        TokenShards.open(shards_dir).check(cfg.train.seq_len, model.config.vocab_size)
    else:
        _check_length(documents, tok, cfg)
    return Setup(cfg, out, device, tok, trained, model, documents, shards_dir, existing)


def _check_length(documents: list[str], tok: Tokenizer, cfg: PretrainConfig) -> None:
    """Each split of the corpus holds more than train.seq_len tokens (or the validation split none), as the shards
    written later must: documents go to the splits as `prepare_shards` sends them (the same seeded picker, in
    order), and only as many are tokenized as it takes to know."""
    need = cfg.train.seq_len + 1
    is_val = val_picker(cfg.data.val_fraction, _split_seed(cfg))
    split = {"train": [], "val": []}
    for doc in documents:
        split["val" if is_val() else "train"].append(doc)
    for name, docs in split.items():
        n = 0
        for doc in docs:
            n += len(tok.encode(doc)) + 1  # + the EOS that joins documents
            if n >= need:
                break
        if name == "train" and n < need or name == "val" and 0 < n < need:
            hint = "; lower data.val_fraction" if name == "val" else ""
            raise UserError(
                f"{_source(cfg)}: the {name} split holds {n} tokens, fewer than train.seq_len + 1 = {need}: give more "
                f"text or lower train.seq_len{hint}"
            )


def _prepared(shards_dir: Path, tok: Tokenizer, cfg: PretrainConfig) -> bool:
    """True when `shards_dir` already holds these documents tokenized with this tokenizer (a resumed run)."""
    try:
        meta = TokenShards.open(shards_dir).meta
    except UserError:
        return False
    return meta.get("tokenizer") == tokenizer_hash(tok) and meta.get("source") == _source(cfg)


def _split_seed(cfg: PretrainConfig) -> int:
    """Which documents are held out: the world's split for the built-in corpus (eval.lm reads the same)."""
    return cfg.seed if cfg.data.path else cfg.world_seed


def _source(cfg: PretrainConfig) -> str:
    if cfg.data.path:
        columns = "".join(f";{k}={v}" for k, v in sorted(cfg.data.columns.items()))
        return ",".join(cfg.data.path) + columns
    return f"builtin(world_seed={cfg.world_seed}, size_mb={cfg.data.builtin_size_mb}, v{SHARD_VERSION})"


def write_data(s: Setup) -> TokenShards:
    """Tokenize the corpus into shards (unless this run's are there already) and save a tokenizer trained here,
    on rank 0 (the others wait, then read what it wrote); the shards are checked against the model."""
    cfg, d = s.cfg, distributed.current()
    if d.is_main:
        if s.documents is not None and not _prepared(s.shards_dir, s.tokenizer, cfg):
            shard_args = (cfg.data.val_fraction, _split_seed(cfg), cfg.data.workers, _source(cfg))
            prepare_shards(s.documents, s.tokenizer, s.shards_dir, *shard_args)
        if s.train_tokenizer:
            s.tokenizer.save(s.out / "tokenizer")
    d.wait_for_main()  # tokenizing a large corpus can outlast the collective timeout
    shards = TokenShards.open(s.shards_dir)
    shards.check(cfg.train.seq_len, s.model.config.vocab_size)
    return shards


def to_batch(x: np.ndarray, y: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.from_numpy(x).to(device), "targets": torch.from_numpy(y).to(device)}


def validate(m: GPT, trainer: Trainer, s: Setup, shards: TokenShards, recall: World | None) -> dict[str, float]:
    """Loss and perplexity on train.eval_batches fixed validation batches, and for the built-in world (`recall`)
    how many of its facts the model completes."""
    args = s.cfg.train
    total, n = 0.0, 0
    for i in range(args.eval_batches):
        b = to_batch(*shards.batch("val", (s.cfg.seed, VAL_KEY, i), args.batch_size, args.seq_len), s.device)
        total, n = total + trainer.loss_sum(b), n + count_targets(b)
    result = {"val_loss": total / n, "val_ppl": math.exp(total / n)}
    if recall is not None:
        result.update(fact_recall(m, s.tokenizer, recall))
    return result


def main(cfg: PretrainConfig, progress: bool = True) -> dict[str, float]:
    s = setup(cfg)
    args = cfg.train
    d = distributed.current()
    prepare_run_dir(cfg.run_args("pretrain"), to_dict(cfg), s.model)
    shards = write_data(s)
    rows = d.rows(args.batch_size * d.dp)  # this rank's rows of each global micro-batch

    def batches(start: int) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The grad_accum micro-batches of each step: random windows of the token shards, seeded by the step."""
        for step in itertools.count(start):
            drawn = [
                shards.batch("train", (cfg.seed, step, m, 0), args.batch_size * d.dp, args.seq_len)
                for m in range(args.grad_accum)
            ]
            yield [to_batch(x[rows], y[rows], s.device) for x, y in drawn]

    has_val = len(shards.val) > args.seq_len
    # Fact recall needs the whole model in one process (generation); the split strategies report losses only.
    recall = World(cfg.world_seed) if not cfg.data.path and d.strategy in ("none", "ddp", "zero1", "fsdp") else None
    trainer = Trainer(prepare_model(s.model.to(s.device), args), args, s.out, device=s.device)
    evaluate = (lambda m: validate(m, trainer, s, shards, recall)) if has_val else None
    if progress:
        print(
            f"pretrain: {num_params(s.model):,} parameters, {len(shards.train):,} train tokens, global batch "
            f"{args.batch_size * args.grad_accum * d.dp * args.seq_len:,} tokens"
        )
    result = fit(
        trainer,
        batches,
        evaluate=evaluate,
        first_record=lambda: {
            "unigram_entropy": unigram_entropy(shards, "val" if has_val else "train"),
            "parameters": num_params(s.model),
            "train_tokens": int(len(shards.train)),
            **(evaluate(s.model) if evaluate else {}),
        },
        save_final=lambda final: save_model(final, s.out / "final", s.tokenizer),
        resume=cfg.resume,
        monitor=cfg.monitor,
        flops_per_token=flops_per_token(s.model.config, args.seq_len),
        progress=progress,
    )
    result = {"step": result["step"], "tokens_seen": trainer.state.tokens_seen, **result}
    if progress:
        print(
            f"pretrain: done; final model in {s.out / 'final'}"
            + (f", val_loss {result['val_loss']:.3f}" if "val_loss" in result else "")
        )
    return result
