"""The shared loop: the loss is the mean over every target token of the optimizer step, however it is split."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from llmstages.config import TrainArgs
from llmstages.losses import IGNORE_INDEX, count_targets, lm_loss
from llmstages.model import GPT, preset
from llmstages.train.loop import accumulate
from llmstages.train.optim import lr_at, param_groups


def _padded_batch(n: int, seq: int = 12, vocab: int = 256, seed: int = 0):
    """Right-padded rows of different lengths: padding is masked out and not a target."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    lengths = torch.randint(3, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0
    targets = torch.cat([ids[:, 1:], torch.zeros(n, 1, dtype=torch.long)], 1)
    target_mask = torch.cat([mask[:, 1:], torch.zeros(n, 1, dtype=torch.long)], 1)
    targets = targets.masked_fill(target_mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "targets": targets, "mask": mask}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_equals_one_big_batch_with_padding():
    torch.manual_seed(0)
    model = GPT(preset("llama_tiny", vocab_size=256, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, block_size=32))
    big = _padded_batch(8)
    loss_big, _ = accumulate(model, [big], lm_loss, count_targets)
    g_big = _grads(model)
    model.zero_grad()
    micro = [{k: v[i : i + 2] for k, v in big.items()} for i in range(0, 8, 2)]
    assert len({count_targets(m) for m in micro}) > 1  # the micro-batches really hold different token counts
    loss_acc, _ = accumulate(model, micro, lm_loss, count_targets)
    g_acc = _grads(model)
    assert abs(loss_big - loss_acc) < 1e-6
    for name in g_big:
        torch.testing.assert_close(g_acc[name], g_big[name], atol=1e-6, rtol=1e-5)
    # and both equal the textbook mean over target tokens, computed from logits
    with torch.no_grad():
        logits = model(big["input_ids"], mask=big["mask"])
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), big["targets"].reshape(-1))
    assert abs(float(ref) - loss_big) < 1e-5


def test_schedule_warmup_then_cosine():
    args = TrainArgs(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, args) == 0.1 and lr_at(9, args) == 1.0
    assert math.isclose(lr_at(60, args), 0.1 + 0.9 * 0.5)  # half way through the cosine
    assert math.isclose(lr_at(110, args), 0.1)


def test_no_decay_on_norms_biases_embeddings():
    model = GPT(preset("gpt2_tiny", n_layers=1))
    decay, rest = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(n.endswith("weight") and "norm" not in n and "emb" not in n for n in decayed)
    assert "blocks.0.attn.q_proj.weight" in decayed
    assert {names[id(p)] for p in rest["params"]} >= {"tok_emb.weight", "pos_emb.weight", "blocks.0.attn_norm.bias"}


def test_native_bf16_detection_agrees_with_the_cpu(monkeypatch):
    """`auto` picks bf16 exactly where the CPU has AMX tiles or AVX512-BF16: what torch.cpu reports, and on Linux
    what the kernel lists in /proc/cpuinfo. LLMSTAGES_AUTO_PRECISION decides instead where it is set."""
    from pathlib import Path

    from llmstages.errors import UserError
    from llmstages.train.start import fast_bf16, resolve_precision

    for forced in ("fp32", "bf16"):
        monkeypatch.setenv("LLMSTAGES_AUTO_PRECISION", forced)
        assert resolve_precision("auto", torch.device("cpu")) == forced
        assert resolve_precision("fp32", torch.device("cpu")) == "fp32"  # only `auto` is decided by it
    monkeypatch.setenv("LLMSTAGES_AUTO_PRECISION", "fp8")
    with pytest.raises(UserError, match="LLMSTAGES_AUTO_PRECISION must be fp32 or bf16"):
        resolve_precision("auto", torch.device("cpu"))
    monkeypatch.delenv("LLMSTAGES_AUTO_PRECISION")

    cpu = torch.device("cpu")
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert fast_bf16(cpu) == native
    info = Path("/proc/cpuinfo")
    if info.is_file():
        flags = {f for line in info.read_text().splitlines() if line.startswith("flags") for f in line.split()}
        assert fast_bf16(cpu) == bool(flags & {"amx_tile", "avx512_bf16"})
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")


def _tiny(seed: int = 0, layers: int = 3) -> GPT:
    torch.manual_seed(seed)
    return GPT(
        preset("llama_tiny", vocab_size=256, n_layers=layers, d_model=64, n_heads=4, n_kv_heads=2, block_size=64)
    )


def test_compiled_blocks_match_eager_compile_once_and_survive_a_deep_copy():
    """compile_blocks: the same loss and gradients as eager (fp32, 1e-5), one graph for all blocks, cached decoding
    left eager (the same tokens, no new graph), and a deep copy (a frozen reference) that runs its own weights."""
    import copy

    from torch._dynamo.utils import counters

    from llmstages.model.generate import generate
    from llmstages.train.prepare import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _tiny(), _tiny()
    compile_blocks(compiled)
    batch = _padded_batch(4, seq=16)
    losses = []
    for m in (eager, compiled):
        loss, _ = lm_loss(m, batch)
        loss.backward()
        losses.append(float(loss.detach()))
    assert math.isclose(losses[0], losses[1], rel_tol=1e-5)
    ge, gc = _grads(eager), _grads(compiled)
    assert ge.keys() == gc.keys()
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], rtol=1e-5, atol=1e-6, msg=n)
    assert counters["stats"]["unique_graphs"] == 1  # three blocks, one graph

    copied, reference = copy.deepcopy(compiled).eval(), copy.deepcopy(eager).eval()
    with torch.no_grad():
        for a, b in zip(copied.parameters(), reference.parameters()):
            a.mul_(0.5)
            b.mul_(0.5)
        x = batch["input_ids"]
        torch.testing.assert_close(copied(x), reference(x), rtol=1e-5, atol=1e-5)
        assert (copied(x) - compiled.eval()(x)).abs().max() > 1e-3  # the copy's own weights, not the original's
    graphs = counters["stats"]["unique_graphs"]
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    assert torch.equal(generate(copied, prompts, 12).tokens, generate(reference, prompts, 12).tokens)
    assert counters["stats"]["unique_graphs"] == graphs  # decoding with the cache compiled nothing


def test_loop_compiles_and_checkpoints_every_block_of_any_stage_model(tmp_path):
    """train.compile and train.activation_checkpointing reach every block the loop trains, also when the stage's
    model holds several trunks (PPO's policy and critic, a reward model's backbone), and change no step's loss."""
    from llmstages.train.loop import Trainer
    from llmstages.train.prepare import prepare_model

    class TwoTrunks(torch.nn.Module):  # the shape of PPO's policy + separate critic
        def __init__(self) -> None:
            super().__init__()
            self.policy, self.critic = _tiny(0, 2), _tiny(1, 2)

    def loss_fn(m, b):
        a, _ = lm_loss(m.policy, b)
        c, _ = lm_loss(m.critic, b)
        return a + c, {}

    batch = _padded_batch(4, seq=16)
    runs = {}
    for options in ({}, {"compile": True, "activation_checkpointing": True}):
        args = TrainArgs(max_steps=3, lr=1e-2, warmup_steps=1, log_every=1, eval_every=100, save_every=100, **options)
        model = TwoTrunks()
        trainer = Trainer(prepare_model(model, args), args, tmp_path / str(len(runs)))
        blocks = [*model.policy.blocks, *model.critic.blocks]
        for attr in ("_forward_uncompiled", "_forward_without_checkpoint"):
            assert all(hasattr(b, attr) for b in blocks) == bool(options), attr
        losses = []
        for _ in range(3):
            loss, _ = trainer.forward_backward([batch], loss_fn, count_targets)
            trainer.optimizer_step(loss)
            losses.append(loss)
        runs[bool(options)] = losses
    for eager, compiled in zip(runs[False], runs[True]):
        assert math.isclose(eager, compiled, rel_tol=1e-5)


def _trainer(tmp_path, model, **train):
    from llmstages.train.loop import Trainer
    from llmstages.train.prepare import prepare_model

    args = TrainArgs(**{"max_steps": 3, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "eval_every": 100,
                        "save_every": 100, "precision": "fp32", **train})  # fmt: skip
    return Trainer(prepare_model(model, args), args, tmp_path)


def _fit(trainer, loss_fn=lm_loss):
    """The shared loop on one fixed batch, no metrics written."""
    from llmstages.monitor.metrics import NullLogger
    from llmstages.train.loop import fit

    batch = _padded_batch(4, seq=16)
    return fit(trainer, lambda start: itertools.repeat([batch]), loss_fn, log=NullLogger(), progress=False)


def test_a_run_that_no_longer_trains_stops_naming_the_step_and_saves_nothing(tmp_path):
    """Poisoned weights: every loss is NaN. The loop skips the bad steps, but a run that ends in them (or reaches
    train.max_bad_steps of them) fails with TrainingFailed naming the step, and writes no checkpoint."""
    from llmstages.train.loop import TrainingFailed

    for max_bad, expected in ((5, "step 3: the run ended with 3 step"), (2, "step 2: the loss or gradient was NaN")):
        model = _tiny()
        with torch.no_grad():
            model.blocks[0].attn.q_proj.weight[0, 0] = float("nan")
        trainer = _trainer(tmp_path / str(max_bad), model, max_bad_steps=max_bad)
        with pytest.raises(TrainingFailed, match=expected):
            _fit(trainer)
        assert not (tmp_path / str(max_bad) / "checkpoints").exists()
        with pytest.raises(TrainingFailed, match=r"step \d: the weights are NaN/Inf \(blocks.0.attn.q_proj.weight\)"):
            trainer.save()  # nor is a checkpoint of NaN weights written on a signal or at save_every


def test_an_isolated_bad_step_is_skipped(tmp_path):
    """One NaN loss among finite ones: that step's update is skipped, the run goes on and saves."""
    calls = []

    def nan_once(m, b):
        loss, stats = lm_loss(m, b)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), stats

    trainer = _trainer(tmp_path, _tiny())
    _fit(trainer, nan_once)
    state = trainer.state
    assert state.step == 3 and state.skipped_steps == 1
    assert (tmp_path / "checkpoints" / "step_3").is_dir()


def test_a_huge_learning_rate_fails_the_pretrain_run_without_a_final_model(tmp_path, capsys):
    """train.lr=1e30 is finite, so the config takes it; the weights blow up after the first step and every later
    gradient is NaN: the run stops with exit 1 and one line naming the step, and final/ is not written."""
    from llmstages.cli import main
    from tests.stages.test_pretrain import SMALL

    argv = ["pretrain", f"out_dir={tmp_path}", *SMALL, "train.max_steps=4", "train.lr=1e30", "train.warmup_steps=0"]
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llmstages")]  # no progress bar
    assert len(err) == 1 and re.match(r"llmstages: error: step 4: .*NaN/Inf", err[0]), err
    assert not (tmp_path / "final").exists() and not (tmp_path / "checkpoints").exists()


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    import errno

    from llmstages.errors import UserError
    from llmstages.train import checkpoint as ckpt

    trainer = _trainer(tmp_path, _tiny(), save_every=1)
    real, saves = ckpt.torch.save, []

    def fills_the_disk(obj, path):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path)

    monkeypatch.setattr(ckpt.torch, "save", fills_the_disk)
    with pytest.raises(UserError) as e:
        _fit(trainer)
    where = tmp_path / "checkpoints" / "step_2"
    assert (
        str(e.value)
        == f"no space left on device: cannot write checkpoint {where} (the earlier checkpoint step_1 is kept)"
    )
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_1"]  # whole, and no half-written one
    assert ckpt.checkpoint_problem(tmp_path / "checkpoints" / "step_1") is None


def test_the_final_model_is_refused_when_the_base_changed_during_the_run(tmp_path):
    """The frozen weights of the final model are read back from model.path: if that folder no longer holds the
    weights the run started from, final_model() refuses, naming both digests."""
    from safetensors.torch import load_file, save_file

    from llmstages.errors import UserError
    from llmstages.outputs import start_run_dir
    from llmstages.store import load_model
    from llmstages.train import checkpoint as ckpt
    from tests.helpers import builtin_base

    base = builtin_base(tmp_path / "base")
    run = tmp_path / "run"
    start_run_dir(run, "sft", False, {"path": str(base), "sha256": ckpt.weights_digest(base)})
    trainer = _trainer(run, load_model(base))
    assert trainer.final_model() is not None  # unchanged: fine
    tensors = load_file(str(base / "model.safetensors"))
    tensors["blocks.0.attn.q_proj.weight"] = tensors["blocks.0.attn.q_proj.weight"] + 1
    save_file(tensors, str(base / "model.safetensors"))  # another model, the same shapes
    with pytest.raises(UserError, match=r"changed while it trained \(its weights' sha256 is now [0-9a-f]{16}, it"):
        trainer.final_model()
