"""The SFT stage end to end from the CLI: LoRA/adapters/full on built-in tasks or user files, exact resume,
a Hugging Face base, and clean errors."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from llmstages.cli import main
from llmstages.monitor.metrics import read_metrics
from llmstages.store import load_model
from tests.helpers import builtin_base, cli_error, hf_model, save_hf, stop_after_step, tiny_tokenizer, trace

FAST = [
    "train.max_steps=8", "train.batch_size=4", "train.seq_len=48", "train.log_every=1", "train.eval_every=4",
    "train.save_every=100", "train.warmup_steps=1", "train.precision=fp32", "data.max_eval_examples=16",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return builtin_base(tmp_path_factory.mktemp("base") / "model")


def _sft(base, out, *extra):
    return main(["sft", f"model.path={base}", f"out_dir={out}", *FAST, *extra])


@pytest.mark.parametrize("method", ["lora", "adapter", "none"])
def test_methods_run_and_save(base_dir, tmp_path, method):
    assert _sft(base_dir, tmp_path, f"peft.method={method}", "peft.target_modules=[all-linear]") == 0
    final = tmp_path / "final"
    assert (final / "adapter_config.json").is_file() == (method != "none")
    records = read_metrics(tmp_path)
    assert records[0]["event"] == "start" and "task_accuracy" in records[0]
    assert any("task_accuracy" in r and r["step"] == 8 for r in records)
    tuned, base = load_model(final), load_model(base_dir)
    x = torch.randint(0, 600, (1, 12))
    with torch.no_grad():
        assert not torch.allclose(tuned(x), base(x), atol=1e-4)  # the saved model carries what was learned


def test_sft_of_a_lora_model_starts_from_it(base_dir, tmp_path):
    """A second SFT on a LoRA SFT model (as Constitutional AI does) merges the first LoRA and trains a new one:
    before any step, the model computes what the first SFT model computes."""
    assert _sft(base_dir, tmp_path / "first", "peft.method=lora", "train.lr=1e-2") == 0
    first = tmp_path / "first" / "final"
    assert _sft(first, tmp_path / "second", "peft.method=lora", "train.max_steps=1", "train.lr=1e-12") == 0
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        expected = load_model(first)(ids)
        got = load_model(tmp_path / "second" / "final")(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_exact_resume(base_dir, tmp_path, monkeypatch):
    assert _sft(base_dir, tmp_path / "a", "peft.method=lora") == 0
    stop_after_step(monkeypatch, 3, signal.SIGINT)
    assert _sft(base_dir, tmp_path / "b", "peft.method=lora") == 130
    monkeypatch.undo()
    assert _sft(base_dir, tmp_path / "b", "peft.method=lora", "resume=true") == 0

    assert trace(tmp_path / "b", "loss") == trace(tmp_path / "a", "loss") and len(trace(tmp_path / "a", "loss")) == 8


def test_user_files_on_a_hugging_face_base(tmp_path):
    base = save_hf(hf_model("llama"), tmp_path / "hf", tiny_tokenizer())
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": "Where does Ada live?", "output": "Oakfield"},
            {"messages": [{"role": "user", "content": "Pet of Bram?"}, {"role": "assistant", "content": "a cat"}]},
            {"prompt": "Two plus three is", "completion": "five"}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _sft(base, tmp_path / "run", f"data.path={data}", f"data.val_path={data}", "peft.method=dora") == 0
    assert "val_loss" in read_metrics(tmp_path / "run")[-1]


def test_show_example(base_dir, capsys):
    assert main(["sft", f"model.path={base_dir}", "--show-example", "0"]) == 0
    out = capsys.readouterr().out
    assert "<|assistant|>" in out and "[" in out and "<|eos|>]" in out


def test_bad_input(base_dir, tmp_path, capsys):
    run = ["sft", f"model.path={base_dir}", f"out_dir={tmp_path / 'x'}", *FAST]
    assert "matched no linear module" in cli_error(capsys, [*run, "peft.method=lora", "peft.target_modules=[qq_proj]"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    assert "bad.jsonl:2: message 1 has unknown role 'robot'" in cli_error(capsys, [*run, f"data.path={bad}"])
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 80, "completion": "yes"}) + "\n")
    err = cli_error(capsys, [*run, f"data.path={long}", "data.truncate=false"])
    assert "long.jsonl:1: example of" in err
    assert "peft.method must be one of" in cli_error(capsys, [*run, "peft.method=qlora"])
    assert not (tmp_path / "x").exists()  # failed starts wrote nothing


def test_long_conversations_are_cut_counted_and_trained(base_dir, tmp_path, capsys):
    """Conversations longer than train.seq_len + 1 are cut (not refused), counted in the banner and the step-0
    record, and the run trains."""
    data = tmp_path / "long.jsonl"
    rows = [{"prompt": "Where does Ada live?", "completion": "Oakfield"}] * 6
    rows += [{"prompt": "Ada lives in Oakfield. " * 30 + "Where does Ada live?", "completion": "Oakfield"}] * 3
    reply = "Ada lives in Oakfield and keeps a cat. " * 20
    rows += [{"messages": [{"role": "user", "content": "Tell me about Ada."}, {"role": "assistant", "content": reply}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _sft(base_dir, tmp_path / "run", f"data.path={data}", "train.max_steps=2") == 0
    assert "10 examples (4 truncated, 0 dropped to fit train.seq_len + 1 = 49 tokens)" in capsys.readouterr().out
    start = read_metrics(tmp_path / "run")[0]
    assert (start["truncated_examples"], start["dropped_examples"]) == (4, 0)


CHATML_WITH_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|system|>You are a helpful assistant.{{ eos_token }}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)  # a template that adds a default system turn, as Qwen2's does


def test_a_model_of_128_tokens_fine_tunes_on_the_builtin_data(tmp_path, capsys):
    """The issue's case: a Hugging Face model with a context of 128 and train.seq_len=64 on the built-in tasks with
    the shipped LoRA recipe. Held-out prompts plus their answers overflow the context: setup fits them (cut from
    the left) and says so, instead of the step-0 evaluation failing after the run folder was written."""
    from llmstages.data.tasks import builtin_tasks
    from llmstages.eval.lm import builtin_items
    from llmstages.stages import RECIPES

    tok = tiny_tokenizer(512)
    tok.chat_template = CHATML_WITH_SYSTEM
    base = save_hf(hf_model("llama", vocab_size=tok.vocab_size, max_position_embeddings=128), tmp_path / "hf", tok)
    items = builtin_items(tok, builtin_tasks(0, 1)["heldout"])[:64]  # one held-out person, 64 prompts: quick
    assert max(len(i.prompt) for i in items) + max(len(tok.encode(i.answer)) for i in items) + 2 > 128
    code = main(["sft", "--config", str(RECIPES / "sft/lora.yaml"), f"model.path={base}", f"out_dir={tmp_path / 'r'}",
                 "train.seq_len=64", "train.max_steps=2", "train.batch_size=32", "train.precision=fp32",
                 "train.eval_every=2", "train.save_every=100", "data.heldout_people=1",
                 "data.max_eval_examples=64"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "evaluation prompts cut from the left" in out and "to fit the model's context of 128 tokens" in out
    records = read_metrics(tmp_path / "r")
    assert records[0]["truncated_examples"] > 0 and "task_accuracy" in records[0]
    assert any(r["step"] == 2 and "task_accuracy" in r for r in records)
    assert (tmp_path / "r" / "final" / "adapter_config.json").is_file()
