"""The shared loop: the loss is the mean over every target token of the optimizer step, however it is split."""

from __future__ import annotations

import math

import torch

from llmstages.config import TrainArgs
from llmstages.losses import IGNORE_INDEX, count_targets, lm_loss
from llmstages.model import GPT, preset
from llmstages.train.loop import accumulate, lr_at, param_groups


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


def test_native_bf16_detection_agrees_with_the_cpu():
    """`auto` picks bf16 exactly where the CPU has AMX tiles or AVX512-BF16: what torch.cpu reports, and on Linux
    what the kernel lists in /proc/cpuinfo."""
    from pathlib import Path

    from llmstages.train.loop import fast_bf16, resolve_precision

    cpu = torch.device("cpu")
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert fast_bf16(cpu) == native
    info = Path("/proc/cpuinfo")
    if info.is_file():
        flags = {f for line in info.read_text().splitlines() if line.startswith("flags") for f in line.split()}
        assert fast_bf16(cpu) == bool(flags & {"amx_tile", "avx512_bf16"})
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
