"""Bad input on every command that writes: exit code 2, one line on stderr naming the key, file or line and what is
wrong, no traceback, and nothing written or changed anywhere (every file under the test's folder hashed before and
after). Then the three ways earlier versions destroyed data with exit 0, each asserting the run survives intact."""

from __future__ import annotations

# ruff: noqa: E501 (the cases below are a table, one per line)
import errno
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llmstages.cli import main
from tests.helpers import hf_model, save_hf, tiny_tokenizer

PRE = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.block_size=64",
    "data.builtin_size_mb=0.05", "data.vocab_size=400", "data.workers=1", "train.max_steps=2", "train.batch_size=4",
    "train.seq_len=32", "train.eval_every=2", "train.save_every=100", "train.warmup_steps=1", "train.precision=fp32",
    "train.eval_batches=1", "monitor.tensorboard=false",
]  # fmt: skip
RL = ["train.precision=fp32", "monitor.tensorboard=false"]

USER_FNS = """
import math
def raises(prompts, responses, ended):
    raise ValueError("my scorer broke")
def too_few(prompts, responses, ended):
    return [1.0]
def strings(prompts, responses, ended):
    return ["good"] * len(responses)
def nans(prompts, responses, ended):
    return [math.nan] * len(responses)
"""


@dataclass
class World:
    root: Path
    paths: dict[str, str]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    p = {"root": str(root), "new": str(root / "new_out")}
    p["base"] = str(_base(root / "base"))
    assert main(["pretrain", f"out_dir={root / 'run'}", *PRE]) == 0
    p["run"] = str(root / "run")
    user = root / "user"
    user.mkdir()
    (user / "notes.txt").write_text("a user's own file\n")
    p["user"], p["file"] = str(user), str(user / "notes.txt")
    # model directories that do not fit together or are broken
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    p["hf"] = str(save_hf(hf_model("llama", vocab_size=tok.vocab_size), root / "hf", tok))
    for name, edit in (("hf_no_vocab", lambda c: c.pop("vocab_size")), ("hf_no_hidden", lambda c: c.pop("hidden_size")),
                       ("hf_bad_hidden", lambda c: c.update(hidden_size="abc")),
                       ("hf_bad_layers", lambda c: c.update(num_hidden_layers=-2))):  # fmt: skip
        shutil.copytree(root / "hf", root / name)
        cfg = json.loads((root / name / "config.json").read_text())
        edit(cfg)
        (root / name / "config.json").write_text(json.dumps(cfg))
        p[name] = str(root / name)
    shutil.copytree(root / "hf", root / "hf_torn")
    (root / "hf_torn" / "config.json").write_text('{"model_type": "llama", "vocab_size": ')
    p["hf_torn"] = str(root / "hf_torn")
    from llmstages.model import GPT, preset
    from llmstages.store import save_model

    big = tiny_tokenizer(600)
    small = GPT(preset("llama_tiny", vocab_size=320, n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, block_size=64))
    p["bigtok"] = str(save_model(small, root / "bigtok", big))
    # data files
    files = {
        "empty_reply.jsonl": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}],
        "out_of_order.jsonl": [
            {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "a"}]}
        ],
        "no_output.jsonl": [{"instruction": "say hi"}],
        "unknown_format.jsonl": [{"question": "q", "answer": "a"}],
        "same_pair.jsonl": [{"prompt": "q", "chosen": "a", "rejected": "a"}],
        "bad_prob.jsonl": [{"prompt": "q", "chosen": "a", "rejected": "b", "probability": 3}],
        "no_chosen.jsonl": [{"prompt": "q", "rejected": "b"}],
        "empty_prompt.jsonl": [{"prompt": "   "}],
        "sg_empty_human.jsonl": [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
                                 {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "yo"}]}],
        "sg_ends_human.jsonl": [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                                                   {"from": "human", "value": "more?"}]}],
    }  # fmt: skip
    for name, rows in files.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        p[name.split(".")[0]] = str(root / name)
    (root / "notjson.jsonl").write_text('{"text": "a"}\n{oops\n')
    p["notjson"] = str(root / "notjson.jsonl")
    (root / "blob.txt").write_bytes(bytes(range(256)) * 4)
    p["blob"] = str(root / "blob.txt")
    (root / "bad.yaml").write_text("train: [1, 2\n")
    p["bad_yaml"] = str(root / "bad.yaml")
    _damaged(root, p)
    _campaign_rerun(root, p)
    fns = root / "fns"
    fns.mkdir()
    (fns / "userfns.py").write_text(USER_FNS)
    sys.path.insert(0, str(fns))
    yield World(root, p)
    sys.path.remove(str(fns))


def _damaged(root: Path, p: dict[str, str]) -> None:
    """Damaged data files and model directories (issue 23): each real, written with the library that makes it and
    then broken as a disk, a download or an editor breaks it."""
    from tests.data.test_records import (
        _bad_utf8_parquet,
        _corrupt_parquet,
        _ragged_csv,
        _truncated_arrow_folder,
        _truncated_gz,
    )

    p["corrupt_parquet"] = str(_corrupt_parquet(root / "corrupt.parquet"))
    p["utf8_parquet"] = str(_bad_utf8_parquet(root / "utf8.parquet"))
    p["ragged_csv"] = str(_ragged_csv(root / "ragged.csv")[0])
    p["cut_gz"] = str(_truncated_gz(root / "cut.csv.gz"))
    p["cut_arrow"] = str(_truncated_arrow_folder(root / "saved_cut"))
    (root / "quote.csv").write_text('text\nfirst document\n"second document, its quote left open\nthird\n')
    p["quote_csv"] = str(root / "quote.csv")
    (root / "late_nul.txt").write_bytes(b"plain text line\n" * 1000 + b"\x00\x01\x02binary tail")
    p["late_nul"] = str(root / "late_nul.txt")
    # model directories: a config or tokenizer config that is null, an array or not UTF-8; zero KV heads; chat
    # templates that do not compile; an adapter config without its method; a symlink loop
    for name, file, body in (("cfg_null", "config.json", b"null"), ("cfg_list", "config.json", b"[]"),
                             ("cfg_latin1", "config.json", b'{"model_type": "caf\xe9"}'),
                             ("tokcfg_null", "tokenizer_config.json", b"null"),
                             ("tokcfg_list", "tokenizer_config.json", b"[]"),
                             ("tokcfg_latin1", "tokenizer_config.json", b'{"eos_token": "\xff"}')):  # fmt: skip
        shutil.copytree(p["base"], root / name)
        (root / name / file).write_bytes(body)
        p[name] = str(root / name)
    edits = {
        "kv0": ("config.json", lambda c: c.update(n_kv_heads=0)),
        "hf_kv0": ("config.json", lambda c: c.update(num_key_value_heads=0)),
        "tmpl_syntax": ("tokenizer_config.json", lambda c: c.update(chat_template="{% for m in messages %}{{ m }")),
        "tmpl_filter": ("tokenizer_config.json",
                        lambda c: c.update(chat_template="{% for m in messages %}{{ m.content | shout }}{% endfor %}")),
        "tmpl_render": ("tokenizer_config.json", lambda c: c.update(chat_template="{{ messages[0].content.nope() }}")),
    }  # fmt: skip
    for name, (file, edit) in edits.items():
        shutil.copytree(p["hf" if name == "hf_kv0" else "base"], root / name)
        cfg = json.loads((root / name / file).read_text())
        edit(cfg)
        (root / name / file).write_text(json.dumps(cfg))
        p[name] = str(root / name)
    shutil.copytree(p["base"], root / "no_method")
    (root / "no_method" / "adapter_config.json").write_text(json.dumps({"rank": 4, "target_modules": ["q_proj"]}))
    p["no_method"] = str(root / "no_method")
    shutil.copytree(p["base"], root / "bad_quant")
    bad_quant = {"method": "lora", "target_modules": ["blocks.0.attn.q_proj"], "quantize_base": "int4"}
    (root / "bad_quant" / "adapter_config.json").write_text(json.dumps(bad_quant))
    p["bad_quant"] = str(root / "bad_quant")
    shutil.copytree(p["base"], root / "peft_lib")  # the peft library's adapter config where ours belongs
    (root / "peft_lib" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    p["peft_lib"] = str(root / "peft_lib")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    p["loop"] = str(root / "loop_a")


def _campaign_rerun(root: Path, p: dict[str, str]) -> None:
    """Inputs of the rerun of the campaign: damaged recipes, a damaged demo folder and run, a folder whose plots/
    holds a user's picture."""
    (root / "binary.yaml").write_bytes(b"\xff\xfe: 1\n")
    (root / "dup.yaml").write_text("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    (root / "demo_torn").mkdir()
    (root / "demo_torn" / "demo.json").write_text("{oops")
    shutil.copytree(root / "run", root / "run_bad_metrics")
    with open(root / "run_bad_metrics" / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe{garbage\n{}\n")
    (root / "pictures" / "plots").mkdir(parents=True)
    (root / "pictures" / "plots" / "pretrain.png").write_bytes(b"\x89PNG\r\n\x1a\n my own picture")
    for name in ("binary.yaml", "dup.yaml", "demo_torn", "run_bad_metrics", "pictures"):
        p[name.split(".")[0]] = str(root / name)


def _base(path: Path) -> Path:
    """A tiny untrained Llama with a context long enough for every stage's default seq_len (128)."""
    from llmstages.data.builtin import builtin_corpus
    from llmstages.data.tokenizer import train_bpe
    from llmstages.model import GPT, preset
    from llmstages.store import save_model

    tok = train_bpe(builtin_corpus(0, 0.1), 500)
    torch.manual_seed(0)
    cfg = preset("llama_tiny", vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2, n_kv_heads=2,
                 block_size=128, eos_token_id=tok.eos_id)  # fmt: skip
    return save_model(GPT(cfg), path, tok)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with the hash of its bytes (folders too, so that a new empty one shows)."""
    out = {}
    for q in sorted(root.rglob("*")):
        if "__pycache__" in q.parts:
            continue
        out[str(q.relative_to(root))] = hashlib.sha256(q.read_bytes()).hexdigest() if q.is_file() else "dir"
    return out


# (id, argv with {placeholders} of the world, what the one line must say)
CASES = [
    # pretrain: config ranges, types, unknown keys, data, the run folder
    ("pretrain-lr", ["pretrain", "out_dir={new}", *PRE, "train.lr=-1"], "train.lr must be > 0, got -1.0"),
    ("pretrain-warmup", ["pretrain", "out_dir={new}", *PRE, "train.warmup_steps=-5"], "train.warmup_steps must be >= 0"),
    ("pretrain-val-1", ["pretrain", "out_dir={new}", *PRE, "data.val_fraction=1.0"], "data.val_fraction must be in [0, 1)"),
    ("pretrain-val-neg", ["pretrain", "out_dir={new}", *PRE, "data.val_fraction=-0.2"], "data.val_fraction must be in"),
    ("pretrain-device", ["pretrain", "out_dir={new}", *PRE, "train.device=tpu"], "train.device must be auto, cpu, cuda"),
    ("pretrain-cuda", ["pretrain", "out_dir={new}", *PRE, "train.device=cuda"], "CUDA is not available"),
    ("pretrain-precision", ["pretrain", "out_dir={new}", *PRE, "train.precision=fp8"], "train.precision must be one of"),
    ("pretrain-steps", ["pretrain", "out_dir={new}", *PRE, "train.max_steps=0"], "train.max_steps must be > 0"),
    ("pretrain-batch", ["pretrain", "out_dir={new}", *PRE, "train.batch_size=0"], "train.batch_size must be > 0"),
    ("pretrain-beta2", ["pretrain", "out_dir={new}", *PRE, "train.beta2=1.0"], "train.beta2 must be in [0, 1)"),
    ("pretrain-clip", ["pretrain", "out_dir={new}", *PRE, "train.grad_clip=-1"], "train.grad_clip must be >= 0"),
    ("pretrain-keep", ["pretrain", "out_dir={new}", *PRE, "train.keep_checkpoints=-1"], "train.keep_checkpoints"),
    ("pretrain-vocab", ["pretrain", "out_dir={new}", *PRE, "data.vocab_size=10"], "data.vocab_size must be >= 300"),
    ("pretrain-layers", ["pretrain", "out_dir={new}", *PRE, "model.n_layers=0"], "model.n_layers must be positive"),
    ("pretrain-type", ["pretrain", "out_dir={new}", *PRE, "model.d_model=abc"], "model.d_model must be an integer"),
    ("pretrain-typo", ["pretrain", "out_dir={new}", *PRE, "train.lrr=1"], "unknown key 'train.lrr'"),
    ("pretrain-strategy", ["pretrain", "out_dir={new}", *PRE, "dist.strategy=zero3"], "dist.strategy must be one of"),
    ("pretrain-yaml", ["pretrain", "--config", "{bad_yaml}", "out_dir={new}"], "invalid YAML"),
    ("pretrain-missing-data", ["pretrain", "out_dir={new}", *PRE, "data.path=[{root}/nothing]"], "does not exist"),
    ("pretrain-binary", ["pretrain", "out_dir={new}", *PRE, "data.path=[{blob}]"], "not a text file"),
    ("pretrain-notjson", ["pretrain", "out_dir={new}", *PRE, "data.path=[{notjson}]"], "notjson.jsonl:2"),
    ("pretrain-out-file", ["pretrain", "out_dir={file}", *PRE], "is a file, not a folder"),
    ("pretrain-out-user", ["pretrain", "out_dir={user}", *PRE], "holds files that no llmstages run wrote"),
    ("pretrain-no-resume", ["pretrain", "out_dir={run}", *PRE], "already holds checkpoints"),
    ("pretrain-resume-size", ["pretrain", "out_dir={run}", *PRE, "resume=true", "model.d_model=128"],
     "the run was made with another model config"),
    ("pretrain-out-other-stage", ["sft", "out_dir={run}", "model.path={base}", *RL], "is a pretrain run"),
    # sft: PEFT settings, model directories, data records
    ("sft-rank", ["sft", "out_dir={new}", "model.path={base}", "peft.method=lora", "peft.rank=0"], "peft.rank must be > 0"),
    ("sft-dropout", ["sft", "out_dir={new}", "model.path={base}", "peft.dropout=2"], "peft.dropout must be in [0, 1)"),
    ("sft-method", ["sft", "out_dir={new}", "model.path={base}", "peft.method=qlora"], "peft.method must be one of"),
    ("sft-alpha", ["sft", "out_dir={new}", "model.path={base}", "peft.alpha=0"], "peft.alpha must be > 0"),
    ("sft-no-model", ["sft", "out_dir={new}", *RL], "set model.path"),
    ("sft-model-missing", ["sft", "out_dir={new}", "model.path={root}/nothing"], "does not exist"),
    ("sft-model-user", ["sft", "out_dir={new}", "model.path={user}"], "no config.json"),
    ("sft-model-file", ["sft", "out_dir={new}", "model.path={file}"], "is not a directory"),
    ("sft-empty-reply", ["sft", "out_dir={new}", "model.path={base}", "data.path=[{empty_reply}]"],
     "empty_reply.jsonl:1: message 2 is an empty assistant reply"),
    ("sft-order", ["sft", "out_dir={new}", "model.path={base}", "data.path=[{out_of_order}]"],
     "out_of_order.jsonl:1: message 1 is a 'assistant' turn where a 'user' turn belongs"),
    ("sft-alpaca", ["sft", "out_dir={new}", "model.path={base}", "data.path=[{no_output}]"], "no_output.jsonl:1"),
    ("sft-format", ["sft", "out_dir={new}", "model.path={base}", "data.path=[{unknown_format}]"],
     "unknown record format (keys: question, answer)"),
    ("sft-heldout", ["sft", "out_dir={new}", "model.path={base}", "data.heldout_people=0"], "data.heldout_people"),
    ("sft-seq", ["sft", "out_dir={new}", "model.path={base}", "train.seq_len=1000"], "above the model's context"),
    ("sft-bigtok", ["sft", "out_dir={new}", "model.path={bigtok}"], "more than the model's vocab_size 320"),
    ("sft-hf-vocab", ["sft", "out_dir={new}", "model.path={hf_no_vocab}"], "'vocab_size' is missing"),
    ("sft-hf-hidden", ["sft", "out_dir={new}", "model.path={hf_no_hidden}"], "'hidden_size' is missing"),
    ("sft-hf-type", ["sft", "out_dir={new}", "model.path={hf_bad_hidden}"], "'hidden_size' must be a positive integer"),
    ("sft-hf-layers", ["sft", "out_dir={new}", "model.path={hf_bad_layers}"], "'num_hidden_layers' must be a positive"),
    ("sft-hf-json", ["sft", "out_dir={new}", "model.path={hf_torn}"], "invalid JSON at line 1"),
    ("sft-out-user", ["sft", "out_dir={user}", "model.path={base}"], "holds files that no llmstages run wrote"),
    # reward and dpo
    ("reward-margin", ["reward", "out_dir={new}", "model.path={base}", "margin=-1"], "margin must be >= 0"),
    ("reward-val", ["reward", "out_dir={new}", "model.path={base}", "data.val_fraction=1.5"], "data.val_fraction"),
    ("reward-samples", ["reward", "out_dir={new}", "model.path={base}", "data.samples=1"], "data.samples must be >= 2"),
    ("reward-same", ["reward", "out_dir={new}", "model.path={base}", "data.path=[{same_pair}]"],
     "same_pair.jsonl:1: chosen and rejected are identical"),
    ("reward-prob", ["reward", "out_dir={new}", "model.path={base}", "data.path=[{bad_prob}]"],
     "bad_prob.jsonl:1: 'probability' must be a number from 0.5 to 1"),
    ("reward-out-file", ["reward", "out_dir={file}", "model.path={base}"], "is a file"),
    ("dpo-beta", ["dpo", "out_dir={new}", "model.path={base}", "dpo.beta=-1"], "dpo.beta must be > 0, got -1.0"),
    ("dpo-smoothing", ["dpo", "out_dir={new}", "model.path={base}", "dpo.label_smoothing=2"], "dpo.label_smoothing"),
    ("dpo-loss", ["dpo", "out_dir={new}", "model.path={base}", "dpo.loss=rso"], "dpo.loss must be one of"),
    ("dpo-kto-weight", ["dpo", "out_dir={new}", "model.path={base}", "dpo.loss=kto", "dpo.kto_desirable_weight=-1"],
     "dpo.kto_desirable_weight must be >= 0, got -1.0"),
    ("dpo-rpo", ["dpo", "out_dir={new}", "model.path={base}", "dpo.rpo_alpha=-1"], "dpo.rpo_alpha must be >= 0"),
    ("dpo-no-chosen", ["dpo", "out_dir={new}", "model.path={base}", "data.path=[{no_chosen}]"],
     "no_chosen.jsonl:1: preference record has no 'chosen'"),
    ("dpo-bigtok", ["dpo", "out_dir={new}", "model.path={bigtok}", "data.path=[{same_pair}]"], "more than the model"),
    # ppo and grpo: settings and the user's reward function
    ("ppo-rollout", ["ppo", "out_dir={new}", "model.path={base}", "ppo.rollout_size=0"], "ppo.rollout_size must be > 0"),
    ("ppo-critic", ["ppo", "out_dir={new}", "model.path={base}", "ppo.critic=twin"], "ppo.critic must be one of"),
    ("ppo-gamma", ["ppo", "out_dir={new}", "model.path={base}", "ppo.gamma=2"], "ppo.gamma must be in [0, 1]"),
    ("ppo-temp", ["ppo", "out_dir={new}", "model.path={base}", "ppo.temperature=0"], "ppo.temperature must be > 0"),
    ("ppo-divisible", ["ppo", "out_dir={new}", "model.path={base}", *RL, "ppo.rollout_size=7"],
     "not divisible by ppo.minibatches"),
    ("ppo-fn-import", ["ppo", "out_dir={new}", "model.path={base}", *RL, "reward.fn=nowhere:f"], "does not import"),
    ("ppo-fn-shape", ["ppo", "out_dir={new}", "model.path={base}", *RL, "reward.fn=userfns"], "must look like"),
    ("ppo-fn-raises", ["ppo", "out_dir={new}", "model.path={base}", *RL, "reward.fn=userfns:raises"],
     "reward function reward.fn=userfns:raises raised ValueError: my scorer broke"),
    ("ppo-fn-count", ["ppo", "out_dir={new}", "model.path={base}", *RL, "reward.fn=userfns:too_few"],
     "must return one finite number per reply (2), returned [1.0]"),
    ("ppo-fn-strings", ["ppo", "out_dir={new}", "model.path={base}", *RL, "reward.fn=userfns:strings"],
     "returned ['good', 'good']"),
    ("ppo-fn-nan", ["ppo", "out_dir={new}", "model.path={base}", *RL, "reward.fn=userfns:nans"], "returned [nan, nan]"),
    ("ppo-reward-model", ["ppo", "out_dir={new}", "model.path={base}", *RL, "reward.model={user}"], "not a reward model"),
    ("grpo-group", ["grpo", "out_dir={new}", "model.path={base}", "grpo.group_size=1"], "grpo.group_size must be >= 2"),
    ("grpo-kl", ["grpo", "out_dir={new}", "model.path={base}", "grpo.kl_beta=-1"], "grpo.kl_beta must be >= 0"),
    ("grpo-clip", ["grpo", "out_dir={new}", "model.path={base}", "grpo.clip=0"], "grpo.clip must be > 0"),
    ("grpo-fn-nan", ["grpo", "out_dir={new}", "model.path={base}", *RL, "reward.fn=userfns:nans"], "returned [nan"),
    ("grpo-prompts", ["grpo", "out_dir={new}", "model.path={base}", *RL, "data.path=[{empty_prompt}]"],
     "empty_prompt.jsonl:1: empty prompt"),
    ("grpo-out-user", ["grpo", "out_dir={user}", "model.path={base}", *RL], "holds files that no llmstages run wrote"),
    ("grpo-fns-weights", ["grpo", "out_dir={new}", "model.path={base}", *RL, "reward.fns=[llmstages.rewards:accuracy,llmstages.rewards:format]", "reward.weights=[1.0]"], "reward.weights has 1 entries for 2 reward.fns"),
    ("grpo-weights-alone", ["grpo", "out_dir={new}", "model.path={base}", *RL, "reward.weights=[2.0]"], "reward.weights weighs reward.fns"),
    ("grpo-weights-nan", ["grpo", "out_dir={new}", "model.path={base}", *RL, "reward.fns=[llmstages.rewards:format]", "reward.weights=[nan]"], "reward.weights[0] must be a finite number"),
    ("ppo-fns-and-model", ["ppo", "out_dir={new}", "model.path={base}", *RL, "reward.fns=[llmstages.rewards:format]", "reward.model={base}"], "set reward.fns or reward.model, not both"),
    ("grpo-fns-column", ["grpo", "out_dir={new}", "model.path={base}", *RL, "reward.fns=[llmstages.rewards:accuracy]"], "reward function accuracy (llmstages.rewards:accuracy) needs the column 'answer', which the prompts do not have"),
    ("grpo-fns-twice", ["grpo", "out_dir={new}", "model.path={base}", *RL, "reward.fns=[llmstages.rewards:format,llmstages.rewards:format]"], "reward.fns names two functions format"),
    ("grpo-fns-import", ["grpo", "out_dir={new}", "model.path={base}", *RL, "reward.fns=[llmstages.rewards:format,nowhere:f]"], "reward.fns 'nowhere:f' does not import"),
    ("ppo-fns-raises", ["ppo", "out_dir={new}", "model.path={base}", *RL, "reward.fns=[llmstages.rewards:format,userfns:raises]"], "reward function raises (userfns:raises) raised ValueError: my scorer broke"),
    ("grpo-fns-count", ["grpo", "out_dir={new}", "model.path={base}", *RL, "reward.fns=[userfns:too_few]"], "reward function too_few (userfns:too_few) must return one finite number per reply (2), returned [1.0]"),
    ("grpo-val-fraction", ["grpo", "out_dir={new}", "model.path={base}", "data.val_fraction=1"], "data.val_fraction must be in [0, 1)"),
    ("grpo-builtin", ["grpo", "out_dir={new}", "model.path={base}", "data.builtin=chess"], "data.builtin must be one of facts, arithmetic, got 'chess'"),
    ("grpo-arithmetic-oracle", ["grpo", "out_dir={new}", "model.path={base}", *RL, "data.builtin=arithmetic"], "data.builtin=arithmetic: the built-in oracle (reward.fn) judges fact questions, not sums"),
    ("ppo-arithmetic-digits", ["ppo", "out_dir={new}", "model.path={base}", "data.arithmetic_digits=4"], "data.arithmetic_digits must be in [1, 3]"),
    ("grpo-arithmetic-room", ["grpo", "out_dir={new}", "model.path={base}", *RL, "data.builtin=arithmetic", "data.arithmetic_digits=1", "reward.fns=[llmstages.rewards:accuracy]"], "2000 training and 64 held-out arithmetic problems with data.arithmetic_digits=1: at most 67 in all"),
    # Constitutional AI
    ("cai-rounds", ["cai", "revise", "out_dir={new}", "model.path={base}", "revise.rounds=0"], "revise.rounds"),
    ("cai-samples", ["cai", "label", "out_dir={new}", "model.path={base}", "label.samples=1"], "label.samples"),
    ("cai-prob", ["cai", "label", "out_dir={new}", "model.path={base}", "label.min_probability=0.3"],
     "label.min_probability must be in [0.5, 1]"),
    ("cai-align", ["cai", "run", "out_dir={new}", "model.path={base}", "run.align=rlhf"], "run.align must be one of"),
    ("cai-constitution", ["cai", "run", "out_dir={new}", "model.path={base}", "constitution={root}/none.yaml"],
     "none.yaml: cannot read the constitution"),
    ("cai-out-user", ["cai", "run", "out_dir={user}", "model.path={base}"], "holds files that no llmstages run wrote"),
    ("cai-out-run", ["cai", "run", "out_dir={run}", "model.path={base}"], "is a pretrain run"),
    ("cai-no-model", ["cai", "revise", "out_dir={new}"], "set model.path"),
    # tokenizer
    ("tok-vocab", ["tokenizer", "--out", "{new}", "--vocab-size", "10"], "--vocab-size must be at least 300"),
    ("tok-out-user", ["tokenizer", "--out", "{user}"], "is not empty and holds no earlier output of this command"),
    ("tok-out-file", ["tokenizer", "--out", "{file}"], "is a file"),
    ("tok-out-run", ["tokenizer", "--out", "{run}"], "is a training run"),
    ("tok-val", ["tokenizer", "--out", "{new}", "--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    ("tok-data", ["tokenizer", "--out", "{new}", "--data", "{root}/nothing"], "does not exist"),
    # export
    ("export-source", ["export", "--model", "{base}", "--out", "{base}"], "is the model being exported"),
    ("export-inside", ["export", "--model", "{run}/final", "--out", "{run}"], "is the model being exported or holds"),
    ("export-run", ["export", "--model", "{base}", "--out", "{run}"], "is a training run"),
    ("export-file", ["export", "--model", "{base}", "--out", "{file}"], "is a file"),
    ("export-user", ["export", "--model", "{base}", "--out", "{user}"], "holds no earlier output of this command"),
    ("export-exists", ["export", "--model", "{base}", "--out", "{hf}"], "already exists; pass --force"),
    ("export-run-force", ["export", "--model", "{base}", "--out", "{run}", "--force"], "is a training run"),
    ("export-peft", ["export", "--model", "{base}", "--format", "peft", "--out", "{new}"], "needs a LoRA or DoRA"),
    ("export-missing", ["export", "--model", "{root}/nothing", "--out", "{new}"], "does not exist"),
    # eval, report, frontier, demo
    ("eval-out-dir", ["eval", "--model", "{base}", "--out", "{user}"], "is a folder; give a file name"),
    ("eval-out-user", ["eval", "--model", "{base}", "--out", "{file}"], "is not an earlier output of this command"),
    ("eval-samples", ["eval", "--model", "{base}", "--samples", "0"], "--samples must be at least 1"),
    ("eval-temp", ["eval", "--model", "{base}", "--temperature", "-1"], "--temperature must be >= 0"),
    ("eval-nothing", ["eval"], "give --model"),
    ("eval-ppl", ["eval", "--labels", "{same_pair}", "--perplexity"], "judge a model: give --model"),
    ("eval-device", ["eval", "--model", "{base}", "--device", "tpu"], "--device must be auto, cpu, cuda"),
    ("report-user", ["report", "{user}"], "not a run directory"),
    ("report-missing", ["report", "{root}/nothing"], "not a directory"),
    ("report-out-user", ["report", "{run}", "--out", "{file}"], "is not an earlier output of this command"),
    ("report-out-dir", ["report", "{run}", "--out", "{user}"], "is a folder"),
    ("frontier-user", ["frontier", "--sft", "{base}", "--out", "{user}"], "holds files that no llmstages run wrote"),
    ("frontier-sft", ["frontier", "--sft", "{root}/nothing", "--out", "{new}"], "does not exist"),
    ("demo-user", ["demo", "--out", "{user}", "--quick"], "is not a demo run folder"),
    ("demo-file", ["demo", "--out", "{file}", "--quick"], "is not a demo run folder"),
    ("demo-run", ["demo", "--out", "{run}", "--quick"], "is not a demo run folder"),
    # generate (writes nothing, must still refuse cleanly)
    ("gen-tokens", ["generate", "--model", "{base}", "--prompt", "Ada", "--max-new-tokens", "-5"], "--max-new-tokens"),
    ("gen-temp", ["generate", "--model", "{base}", "--prompt", "Ada", "--temperature", "-1"], "--temperature must be"),
    ("gen-top-p-0", ["generate", "--model", "{base}", "--prompt", "Ada", "--top-p", "0"], "--top-p must be in (0, 1]"),
    ("gen-top-p-2", ["generate", "--model", "{base}", "--prompt", "Ada", "--top-p", "2"], "--top-p must be in (0, 1]"),
    ("gen-top-k", ["generate", "--model", "{base}", "--prompt", "Ada", "--top-k", "-3"], "--top-k must be at least 1"),
    ("gen-cuda", ["generate", "--model", "{base}", "--prompt", "Ada", "--device", "cuda"], "CUDA is not available"),
    ("gen-bigtok", ["generate", "--model", "{bigtok}", "--prompt", "Ada"], "more than the model's vocab_size"),
    ("gen-empty", ["generate", "--model", "{base}", "--prompt", ""], "--prompt is empty"),
    ("memory-model", ["estimate-memory", "--model", "llama_huge"], "neither a preset"),
    # issue 23: damaged data files, named with the line or row where known
    ("pretrain-parquet-page", ["pretrain", "out_dir={new}", *PRE, "data.path=[{corrupt_parquet}]"],
     "corrupt.parquet: damaged or truncated: "),
    ("pretrain-parquet-utf8", ["pretrain", "out_dir={new}", *PRE, "data.path=[{utf8_parquet}]"],
     "utf8.parquet:2: column 'text' is not UTF-8 text"),
    ("pretrain-csv-ragged", ["pretrain", "out_dir={new}", *PRE, "data.path=[{ragged_csv}]"],
     "ragged.csv:40002: 3 fields where the header has 2 (text, label)"),
    ("pretrain-csv-gz-cut", ["pretrain", "out_dir={new}", *PRE, "data.path=[{cut_gz}]"],
     "cut.csv.gz: cannot be read as .csv.gz after line"),
    ("pretrain-arrow-cut", ["pretrain", "out_dir={new}", *PRE, "data.path=[{cut_arrow}]"],
     "data-00000-of-00001.arrow: damaged or truncated: rows after 1000 cannot be read"),
    ("pretrain-csv-quote", ["pretrain", "out_dir={new}", *PRE, "data.path=[{quote_csv}]"],
     "quote.csv:3: a quoted field opens here and is never closed"),
    ("pretrain-late-nul", ["pretrain", "out_dir={new}", *PRE, "data.path=[{late_nul}]"],
     "late_nul.txt:1001: not a text file (it contains NUL bytes"),
    # issue 23: model directories
    ("sft-config-null", ["sft", "out_dir={new}", "model.path={cfg_null}"], "config.json: expected a JSON object ({...}), got null"),
    ("sft-config-list", ["sft", "out_dir={new}", "model.path={cfg_list}"], "config.json: expected a JSON object ({...}), got an array"),
    ("gen-config-latin1", ["generate", "--model", "{cfg_latin1}", "--prompt", "Ada"], "config.json:1: not UTF-8 text"),
    ("sft-tokconfig-null", ["sft", "out_dir={new}", "model.path={tokcfg_null}"], "tokenizer_config.json: expected a JSON object ({...}), got null"),
    ("gen-tokconfig-list", ["generate", "--model", "{tokcfg_list}", "--prompt", "Ada"], "tokenizer_config.json: expected a JSON object ({...}), got an array"),
    ("chat-tokconfig-latin1", ["chat", "--model", "{tokcfg_latin1}"], "tokenizer_config.json:1: not UTF-8 text"),
    ("sft-kv-heads-0", ["sft", "out_dir={new}", "model.path={kv0}"], "kv0/config.json: model.n_kv_heads must be positive, got 0"),
    ("gen-hf-kv-heads-0", ["generate", "--model", "{hf_kv0}", "--prompt", "Ada"], "'num_key_value_heads' must be a positive integer, got 0"),
    ("chat-template-syntax", ["chat", "--model", "{tmpl_syntax}"], "tokenizer_config.json: the chat template does not compile (template line 1: unexpected '}'"),
    ("sft-template-syntax", ["sft", "out_dir={new}", "model.path={tmpl_syntax}"], "the chat template does not compile"),
    ("chat-template-filter", ["chat", "--model", "{tmpl_filter}"], "tokenizer_config.json: the chat template does not compile (template line 1: No filter named 'shout'"),
    ("sft-template-filter", ["sft", "out_dir={new}", "model.path={tmpl_filter}"], "No filter named 'shout'"),
    ("sft-template-render", ["sft", "out_dir={new}", "model.path={tmpl_render}"], "tokenizer_config.json: the chat template failed (UndefinedError"),
    ("sft-adapter-method", ["sft", "out_dir={new}", "model.path={no_method}"], "adapter_config.json: no 'method' (one of lora, dora, adapter)"),
    ("gen-adapter-quantize", ["generate", "--model", "{bad_quant}", "--prompt", "Ada"], "adapter_config.json: 'quantize_base' must be none or nf4, got 'int4'"),
    ("gen-adapter-peft-lib", ["generate", "--model", "{peft_lib}", "--prompt", "Ada"], "no 'method' (one of lora, dora, adapter) (this is the peft library's format, peft_type LORA"),
    ("gen-model-loop", ["generate", "--model", "{loop}", "--prompt", "Ada"], "loop_a' is a symlink loop"),
    ("pretrain-data-loop", ["pretrain", "out_dir={new}", *PRE, "data.path=[{loop}]"], "loop_a' is a symlink loop"),
    # issue 23: options out of range, outputs through a file
    ("chat-temp-nan", ["chat", "--model", "{base}", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    ("gen-temp-inf", ["generate", "--model", "{base}", "--prompt", "Ada", "--temperature", "inf"], "--temperature must be a finite number"),
    ("eval-temp-nan", ["eval", "--model", "{base}", "--temperature", "nan"], "--temperature must be a finite number"),
    ("memory-seq", ["estimate-memory", "--model", "llama_tiny", "--seq-len", "-1"], "--seq-len must be at least 1, got -1"),
    ("memory-seq-0", ["estimate-memory", "--model", "llama_tiny", "--seq-len", "0"], "--seq-len must be at least 1, got 0"),
    ("memory-rank", ["estimate-memory", "--model", "llama_tiny", "--method", "lora", "--lora-rank", "0"], "--lora-rank must be at least 1"),
    ("tok-out-through-file", ["tokenizer", "--out", "{file}/sub"], "notes.txt is a file, not a folder"),
    ("export-out-through-file", ["export", "--model", "{base}", "--out", "{file}/sub"], "notes.txt is a file, not a folder"),
    ("export-gguf-through-file", ["export", "--model", "{base}", "--format", "gguf", "--out", "{file}/m.gguf"], "notes.txt is a file, not a folder"),
    ("eval-out-through-file", ["eval", "--model", "{base}", "--out", "{file}/eval.json"], "notes.txt is a file, not a folder"),
    ("sft-out-through-file", ["sft", "out_dir={file}/run", "model.path={base}", *RL], "notes.txt is a file, not a folder"),
    ("pretrain-out-through-file", ["pretrain", "out_dir={file}/run", *PRE], "notes.txt is a file, not a folder"),
    ("report-out-through-file", ["report", "{run}", "--out", "{file}/r.html"], "notes.txt is a file, not a folder"),
    ("pretrain-seed", ["pretrain", "out_dir={new}", *PRE, "seed=18446744073709551616"], "seed must be in [0, 4294967295]"),
    ("pretrain-lr-inf", ["pretrain", "out_dir={new}", *PRE, "train.lr=inf"], "train.lr must be a finite number"),
    ("dpo-beta-nan", ["dpo", "out_dir={new}", "model.path={base}", "dpo.beta=nan"], "dpo.beta must be a finite number"),
    ("ppo-kl-inf", ["ppo", "out_dir={new}", "model.path={base}", "ppo.kl_coef=inf"], "ppo.kl_coef must be a finite"),
    ("sft-alpha-inf", ["sft", "out_dir={new}", "model.path={base}", "peft.alpha=inf"], "peft.alpha must be a finite"),
    ("grpo-temp-inf", ["grpo", "out_dir={new}", "model.path={base}", "grpo.temperature=inf"], "grpo.temperature must be a finite"),
    # the campaign's rerun
    ("sft-sharegpt-empty-human", ["sft", "out_dir={new}", "model.path={base}", "data.path=[{sg_empty_human}]"], "sg_empty_human.jsonl:2: message 1 is an empty user turn"),
    ("sft-sharegpt-ends-human", ["sft", "out_dir={new}", "model.path={base}", "data.path=[{sg_ends_human}]"], "sg_ends_human.jsonl:1: message 3 is a user turn after the last reply"),
    ("demo-through-file", ["demo", "--out", "{file}/demo", "--quick"], "notes.txt is a file, not a folder"),
    ("demo-torn-mark", ["demo", "--out", "{demo_torn}", "--quick"], "demo.json: damaged demo mark"),
    ("sft-yaml-binary", ["sft", "--config", "{binary}", "out_dir={new}", "model.path={base}"], "binary.yaml: not a UTF-8 text file"),
    ("sft-yaml-dup", ["sft", "--config", "{dup}", "out_dir={new}", "model.path={base}"], "dup.yaml: line 3 invalid YAML (key 'lr' is given twice)"),
    ("cai-constitution-binary", ["cai", "revise", "out_dir={new}", "model.path={base}", "constitution={binary}"], "binary.yaml: the constitution is not UTF-8 text"),
    ("report-torn-metrics", ["report", "{run_bad_metrics}", "--out", "{new}/r.html"], "not a JSON record (the run's metrics file is damaged)"),
    ("report-users-picture", ["report", "{run}", "--out", "{pictures}/report.html"], "holds other files than this command's plots"),
    ("memory-type", ["estimate-memory", "--model", "llama_tiny", "--seq-len", "abc"], "estimate-memory: argument --seq-len: invalid int value: 'abc'"),
    ("gen-type", ["generate", "--model", "{base}", "--prompt", "Ada", "--top-k", "abc"], "generate: argument --top-k: invalid int value"),
    ("sft-rank-huge", ["sft", "out_dir={new}", "model.path={base}", "peft.method=lora", "peft.rank=100000000"], "peft.rank=100000000: the adapters would take"),
    ("sft-bottleneck-huge", ["sft", "out_dir={new}", "model.path={base}", "peft.method=adapter", "peft.bottleneck=1000000000"], "peft.bottleneck=1000000000: the adapters would take"),
    ("grpo-loss-type", ["grpo", "out_dir={new}", "model.path={base}", "grpo.loss_type=ppo"], "grpo.loss_type must be one of dapo, grpo, dr_grpo, bnpo, gspo"),
    ("grpo-advantage", ["grpo", "out_dir={new}", "model.path={base}", "grpo.advantage=gae"], "grpo.advantage must be one of group, rloo, reinforce_pp"),
    ("grpo-clip-high", ["grpo", "out_dir={new}", "model.path={base}", "grpo.clip_high=-0.1"], "grpo.clip_high must be > 0"),
    ("grpo-iterations", ["grpo", "out_dir={new}", "model.path={base}", "grpo.iterations=0"], "grpo.iterations must be >= 1, got 0"),
    ("grpo-sampling-rounds", ["grpo", "out_dir={new}", "model.path={base}", "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=0"], "grpo.max_sampling_rounds must be >= 1"),
    ("grpo-dynamic-sampling", ["grpo", "out_dir={new}", "model.path={base}", "grpo.dynamic_sampling=maybe"], "grpo.dynamic_sampling must be true or false"),
    ("sft-batch-huge", ["sft", "out_dir={new}", "model.path={base}", *RL, "train.batch_size=1000000000000", "train.seq_len=48"], "train.batch_size=1000000000000 with"),
]  # fmt: skip


def test_there_are_enough_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 80
    assert {c[1][0] for c in CASES} >= {"pretrain", "sft", "reward", "dpo", "ppo", "grpo", "cai", "tokenizer",
                                         "export", "eval", "report", "frontier", "demo", "generate", "chat",
                                         "estimate-memory"}  # fmt: skip


@pytest.mark.parametrize(("argv", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_nothing_changes(world, capsys, argv, says):
    argv = [a.format(**world.paths) for a in argv]
    before = snapshot(world.root)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmstages: error"), err
    assert says in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(world.root) == before  # nothing written, deleted or changed anywhere


@pytest.mark.parametrize("found", ["nothing", "clang++ only"])
def test_compile_without_a_cpu_compiler_is_refused_and_nothing_changes(world, capsys, monkeypatch, tmp_path, found):
    """Refused where inductor would find no compiler: none on the PATH, or (Linux, $CXX unset) only clang++,
    which inductor does not try there."""
    from torch._inductor import config

    if found == "clang++ only":
        (tmp_path / "clang++").write_text("#!/bin/sh\n")
        (tmp_path / "clang++").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path) if found == "clang++ only" else "")
    before = snapshot(world.root)
    argv = ["sft", f"out_dir={world.paths['new']}", f"model.path={world.paths['base']}", *RL, "train.compile=true"]
    with config.patch({"cpp.cxx": (None, "g++")}):  # inductor's Linux default with $CXX unset
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmstages: error") and "train.compile=true on the CPU needs a C++ compiler" in err, err
    assert len(err.splitlines()) == 1 and snapshot(world.root) == before


# -- the data-loss cases of earlier versions ------------------------------------------------------------------------


def test_export_over_a_training_run_leaves_it_intact(world, capsys):
    before = snapshot(Path(world.paths["run"]))
    for fmt in ("hf", "merged"):
        assert main(["export", "--model", world.paths["base"], "--format", fmt, "--out", world.paths["run"]]) == 2
        assert main(["export", "--model", world.paths["base"], "--format", fmt, "--out", world.paths["run"],
                     "--force"]) == 2  # fmt: skip
    assert "is a training run" in capsys.readouterr().err
    assert snapshot(Path(world.paths["run"])) == before


def test_export_onto_its_own_source_leaves_it_intact(world, tmp_path, capsys):
    src = tmp_path / "lora"
    assert main(["sft", f"model.path={world.paths['base']}", f"out_dir={tmp_path / 'sft'}", "peft.method=lora",
                 "train.max_steps=1", "train.batch_size=2", "train.seq_len=48", "data.max_eval_examples=2",
                 *RL]) == 0  # fmt: skip
    shutil.copytree(tmp_path / "sft" / "final", src)
    before = snapshot(src)
    assert (src / "adapter_config.json").is_file()
    assert main(["export", "--model", str(src), "--format", "merged", "--out", str(src)]) == 2
    assert main(["export", "--model", str(src), "--format", "merged", "--out", str(src), "--force"]) == 2
    assert "is the model being exported" in capsys.readouterr().err
    assert snapshot(src) == before
    # and an export elsewhere works, and can be replaced with --force
    out = tmp_path / "merged"
    assert main(["export", "--model", str(src), "--format", "merged", "--out", str(out)]) == 0
    assert main(["export", "--model", str(src), "--format", "merged", "--out", str(out)]) == 2
    assert main(["export", "--model", str(src), "--format", "merged", "--out", str(out), "--force"]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()


def test_pretrain_into_a_users_folder_leaves_it_intact(world, capsys):
    before = snapshot(Path(world.paths["user"]))
    assert main(["pretrain", *PRE, f"out_dir={world.paths['user']}"]) == 2
    assert main(["pretrain", *PRE, f"out_dir={world.paths['user']}", "overwrite=true"]) == 2
    assert main(["pretrain", *PRE, f"out_dir={world.paths['user']}", "resume=true"]) == 2
    assert "holds files that no llmstages run wrote" in capsys.readouterr().err
    assert snapshot(Path(world.paths["user"])) == before


def test_overwrite_restarts_only_its_own_run(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", f"out_dir={run}", *PRE]) == 0
    (run / "my_notes.txt").write_text("kept")  # something of the user's inside the run folder
    first = (run / "final" / "model.safetensors").read_bytes()
    assert main(["pretrain", f"out_dir={run}", *PRE, "overwrite=true", "seed=1"]) == 0
    assert (run / "my_notes.txt").read_text() == "kept"
    assert (run / "final" / "model.safetensors").read_bytes() != first  # trained again, from the other seed
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())][0] == 0


# -- issue 23: a full disk, and valid input that used to be refused --------------------------------------------------

NO_SPACE = [
    OSError(errno.ENOSPC, "No space left on device"),
    # what safetensors' Rust writer raises on a full disk: its own exception type, the OS error in the text
    "safetensors",
]


def _writer_fails(what, path_first: bool = False):
    """A writer that writes part of its file, then fails as a full disk does (safetensors' `save_file`, or with
    `path_first` our own `write_safetensors`)."""

    def write(tensors, filename, metadata=None):  # noqa: ARG001
        if path_first:
            tensors, filename = filename, tensors
        Path(filename).write_bytes(b"\0" * 100)
        if what == "safetensors":
            from safetensors import SafetensorError

            raise SafetensorError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            )
        raise what

    return write


@pytest.mark.parametrize(
    ("fmt", "error"),
    [("hf", NO_SPACE[0]), ("hf", NO_SPACE[1]), ("merged", NO_SPACE[0])],
    ids=["oserror-hf", "rust-hf", "oserror-merged"],
)  # merged: our model directory, written by our own writer (an OSError on a full disk, never the Rust one)
def test_a_full_disk_during_export_keeps_the_earlier_export(world, tmp_path, capsys, monkeypatch, fmt, error):
    out = tmp_path / "export"
    assert main(["export", "--model", world.paths["base"], "--format", fmt, "--out", str(out)]) == 0
    before = snapshot(tmp_path)
    monkeypatch.setattr("llmstages.store.io.save_file", _writer_fails(error))
    monkeypatch.setattr("llmstages.store.hf.write_safetensors", _writer_fails(error, path_first=True))
    capsys.readouterr()
    assert main(["export", "--model", world.paths["base"], "--format", fmt, "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    what = "export" if fmt == "hf" else "model directory"  # merged: our model directory, written by save_model
    assert err == f"llmstages: error: no space left on device: {out} (the earlier {what} there is kept)\n", err
    assert snapshot(tmp_path) == before  # the earlier export whole, no temporary folder left beside it


def test_a_full_disk_during_a_first_export_leaves_nothing(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("llmstages.store.io.save_file", _writer_fails(NO_SPACE[0]))
    assert main(["export", "--model", world.paths["base"], "--out", str(tmp_path / "export")]) == 2
    assert "(nothing was written there)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_a_gguf_export_keeps_the_earlier_file(world, tmp_path, capsys, monkeypatch):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "model.gguf"
    assert main(["export", "--model", world.paths["base"], "--format", "gguf", "--out", str(out)]) == 0
    before = snapshot(tmp_path)

    def fails(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fails)
    capsys.readouterr()
    assert main(["export", "--model", world.paths["base"], "--format", "gguf", "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert err == f"llmstages: error: no space left on device: {out} (the earlier GGUF file there is kept)\n", err
    assert snapshot(tmp_path) == before


def test_a_full_disk_during_a_tokenizer_rewrite_keeps_the_earlier_one(tmp_path, capsys, monkeypatch):
    from llmstages.data.tokenizer import Tokenizer

    out = tmp_path / "tok"
    assert main(["tokenizer", "--out", str(out), "--vocab-size", "300"]) == 0
    before = snapshot(tmp_path)

    def save(self, path):  # tokenizers' Rust writer reports a full disk as a plain Exception
        (Path(path) / "tokenizer.json").write_text('{"version": ')
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(Tokenizer, "save", save)
    capsys.readouterr()
    assert main(["tokenizer", "--out", str(out), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert err == f"llmstages: error: no space left on device: {out} (the earlier tokenizer folder there is kept)\n"
    assert snapshot(tmp_path) == before


def test_a_csv_column_of_digits_is_text(tmp_path):
    """CSV cells are text: a column of digits is documents of digits, not integers refused as 'not a string'."""
    data = tmp_path / "digits.csv"
    data.write_text("text\n" + "".join(f"{i * 7919 % 100003}{i * 31 % 997}{i}\n" for i in range(3000)))
    assert main(["pretrain", f"out_dir={tmp_path / 'run'}", *PRE, f"data.path=[{data}]"]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
