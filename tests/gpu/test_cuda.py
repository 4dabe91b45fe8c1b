"""CUDA paths: bf16 and fp16 training steps, torch.compile, generation. Skipped where no GPU is present."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmstages.config import TrainArgs
from llmstages.losses import lm_loss
from llmstages.model import GPT, generate, preset
from llmstages.train.loop import Trainer, fit
from llmstages.train.prepare import prepare_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model():
    torch.manual_seed(0)
    return GPT(preset("llama_tiny", vocab_size=512, n_layers=2, block_size=64))


def _batch(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 512, (4, 33), generator=g)
    return {"input_ids": x[:, :-1].to(device), "targets": x[:, 1:].to(device)}


def test_forward_matches_cpu_in_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = _model()
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda()).cpu()
    assert (cpu - gpu).abs().max() < 1e-4


def test_greedy_generation_matches_cpu():
    model = _model()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    cpu = generate(model, prompts, 16).tokens
    gpu = generate(model.cuda(), prompts, 16).tokens.cpu()
    assert torch.equal(cpu, gpu)


@pytest.mark.parametrize(("precision", "compile"), [("bf16", False), ("fp16", False), ("bf16", True)])
def test_low_precision_loop_learns(tmp_path, precision, compile):
    device = torch.device("cuda")
    model = _model().to(device)
    batch = _batch(device)
    with torch.no_grad():
        start = float(lm_loss(model, batch)[0]) / batch["targets"].numel()
    args = TrainArgs(max_steps=30, lr=3e-3, warmup_steps=2, precision=precision, log_every=1, eval_every=100,
                     save_every=100, device="cuda", compile=compile)  # fmt: skip
    trainer = Trainer(prepare_model(model, args), args, tmp_path, device=device)
    fit(trainer, lambda start: itertools.repeat([batch]), progress=False)
    with torch.no_grad():
        end = float(lm_loss(model, batch)[0]) / batch["targets"].numel()
    assert end < 0.5 * start
    assert trainer.state.skipped_steps <= 2  # fp16 may skip a step or two while the scaler settles
