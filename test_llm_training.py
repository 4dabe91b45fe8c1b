"""Seed-facing acceptance tests: the guide's snippets, verbatim where it gives them, grouped as in the guide.

Run with `python -m pytest test_llm_training.py -v`. Deeper checks live in tests/ (mirroring the package).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from exercise import SimpleLLM, TrainingConfig

ROOT = Path(__file__).resolve().parent


class TestModel:
    def test_quick_start_snippet(self):
        # The guide's "Test Basic Model Implementation", verbatim.
        config = TrainingConfig(vocab_size=10000, hidden_size=512, num_layers=6, num_heads=8, max_seq_length=512)
        model = SimpleLLM(config)
        input_ids = torch.randint(0, config.vocab_size, (2, 10))
        outputs = model(input_ids)
        assert outputs["logits"].shape == (2, 10, 10000)
        assert sum(p.numel() for p in model.parameters()) > 0

    def test_benchmark_loop_is_a_real_training_step(self):
        # The guide's speed loop: `loss = outputs['loss'] if 'loss' in outputs else ...; loss.backward()`.
        config = TrainingConfig(batch_size=8)
        model = SimpleLLM(config)
        data = torch.randint(0, config.vocab_size, (8, 512))
        outputs = model(data)
        assert "loss" in outputs
        loss = outputs["loss"] if "loss" in outputs else torch.tensor(0.0)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        # The loss of a random model is about log(vocab): it predicts nothing yet.
        assert abs(loss.item() - torch.log(torch.tensor(config.vocab_size)).item()) < 0.5

    def test_loss_is_next_token_cross_entropy(self):
        model = SimpleLLM(TrainingConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2))
        x = torch.randint(0, 50, (3, 7))
        out = model(x)
        logp = torch.log_softmax(out["logits"], -1)
        manual = -torch.stack([logp[b, t, x[b, t + 1]] for b in range(3) for t in range(6)]).mean()
        assert torch.allclose(out["loss"], manual, atol=1e-6)
        labels = x.clone()
        labels[:, :4] = -100  # only the last positions trained
        manual = -torch.stack([logp[b, t, x[b, t + 1]] for b in range(3) for t in range(3, 6)]).mean()
        assert torch.allclose(model(x, labels=labels)["loss"], manual, atol=1e-6)

    def test_training_lowers_the_loss(self):
        torch.manual_seed(0)
        config = TrainingConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, max_seq_length=64)
        model = SimpleLLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        x = (torch.arange(32)[None] * torch.arange(1, 5)[:, None]) % 64  # four fixed sequences
        first = model(x)["loss"].item()
        for _ in range(30):
            loss = model(x)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.3 * first

    def test_gpt2_architecture(self):
        model = SimpleLLM(TrainingConfig(vocab_size=100, hidden_size=32, num_layers=1, num_heads=2,
                                         architecture="gpt2"))  # fmt: skip
        assert model.model.config.pos == "learned" and model.model.lm_head.weight is model.model.tok_emb.weight


class TestPEFT:
    def test_seed_peft_snippet(self):
        # The guide's "Test Parameter-Efficient Fine-tuning", verbatim.
        from exercise import AdapterLayer, LoRALayer

        linear_layer = torch.nn.Linear(512, 512)
        lora_layer = LoRALayer(linear_layer, rank=16, alpha=32)
        total_params = sum(p.numel() for p in lora_layer.parameters())
        trainable_params = sum(p.numel() for p in lora_layer.parameters() if p.requires_grad)
        assert trainable_params == 2 * 16 * 512  # A (16 x 512) and B (512 x 16)
        assert total_params == 512 * 512 + 512 + trainable_params
        adapter = AdapterLayer(hidden_size=512, adapter_size=64)
        test_input = torch.randn(2, 10, 512)
        output = adapter(test_input)
        assert output.shape == (2, 10, 512)
        assert torch.equal(output, test_input)  # the up-projection starts at zero: identity at init

    def test_lora_layer_starts_as_the_base_and_learns(self):
        from exercise import LoRALayer

        base = torch.nn.Linear(32, 32)
        lora = LoRALayer(base, rank=4, alpha=8)
        x = torch.randn(8, 32)
        target = torch.randn(8, 32)
        assert torch.equal(lora(x), base(x))
        opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.1)
        first = torch.nn.functional.mse_loss(lora(x), target).item()
        for _ in range(20):
            loss = torch.nn.functional.mse_loss(lora(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < first and base.weight.grad is None


class TestDistributedTraining:
    def test_torchrun_exercise(self):
        # The guide's `torchrun --nproc_per_node=2 exercise.py`, on CPU with gloo.
        with socket.socket() as s:  # a rendezvous port of its own, not torchrun's shared default 29500
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "STEPS": "12", "OMP_NUM_THREADS": "1", "PET_MASTER_PORT": str(port)}
        r = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "exercise.py"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-8000:]
        assert "world size 2" in r.stdout
        assert "rank 1 step" in r.stdout and "done: final global loss" in r.stdout
