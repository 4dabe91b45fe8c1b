"""Shared test helpers: tiny Hugging Face models from configs (random weights, no downloads), a tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from llmstages.data.tokenizer import Tokenizer, train_bpe

TEXT = [
    "Ada lives in Oakfield and keeps a grey cat.",
    "Bram works as a baker in Millbrook; his favourite colour is green.",
    "Two plus three is five. Seven minus four is three.",
] * 20


def tiny_tokenizer(vocab_size: int = 300) -> Tokenizer:
    return train_bpe(TEXT, vocab_size=vocab_size)


def hf_config(kind: str, vocab_size: int = 300, **kw):
    """A tiny transformers config of the given family."""
    import transformers as tf

    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)  # fmt: skip
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    common.update(kw)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[kind]
    return cls(**common)


def hf_model(kind: str, seed: int = 0, **kw):
    """A random-initialised HF causal LM; biases and norm weights randomised too so that they are checked."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(kind, **kw), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf(model, path: Path, tokenizer: Tokenizer | None = None) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def builtin_base(path: Path) -> Path:
    """A tiny untrained Llama with a BPE trained on a slice of the built-in corpus, saved as a model directory."""
    from llmstages.data.builtin import builtin_corpus
    from llmstages.model import GPT, preset
    from llmstages.store import save_model

    tok = train_bpe(builtin_corpus(0, 0.2), 600)
    torch.manual_seed(0)
    model = GPT(preset("llama_tiny", vocab_size=tok.vocab_size, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                       block_size=64, eos_token_id=tok.eos_id))  # fmt: skip
    return save_model(model, path, tok)


def stop_after_step(monkeypatch, step: int, sig: int | None = None) -> None:
    """Deliver a real SIGTERM (or `sig`) to this process right after optimizer step `step + 1` of the next run:
    the loop's handler saves a checkpoint and the run exits with code 130. Undo with monkeypatch.undo()."""
    import os
    import signal

    from llmstages.train import loop as loop_mod

    real = loop_mod.Trainer.optimizer_step

    def step_then_signal(self, loss):
        out = real(self, loss)
        if self.state.step == step:
            os.kill(os.getpid(), sig or signal.SIGTERM)
        return out

    monkeypatch.setattr(loop_mod.Trainer, "optimizer_step", step_then_signal)


def trace(run: Path, *keys: str) -> list[tuple]:
    """(step, *keys) of every metrics record that has keys[0]."""
    from llmstages.monitor.metrics import read_metrics

    return [(r["step"], *(r[k] for k in keys)) for r in read_metrics(run) if keys[0] in r]


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI on `argv`, expecting bad input: exit code 2 and one line on stderr, no traceback; that line."""
    from llmstages.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err
