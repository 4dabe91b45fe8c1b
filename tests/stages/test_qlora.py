"""QLoRA (peft.quantize_base=nf4) through the stages from the CLI: each stage trains its LoRA/DoRA over a base
held in NF4, final/ holds the base exactly as it was loaded plus the adapter, the adapter exports to peft and
gives our logits in transformers, a run killed with SIGKILL resumes to the uninterrupted run's losses, and
settings that do not go with it are refused before anything is written."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmstages.cli import main
from llmstages.peft import nf4
from llmstages.peft.nf4 import NF4Weight
from llmstages.store import load_model
from llmstages.train import prepare
from llmstages.train.frozen import quantized_weights
from tests.helpers import builtin_base, cli_error, hf_model, save_hf, tiny_tokenizer, trace

ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "train.max_steps=4", "train.batch_size=4", "train.seq_len=48", "train.log_every=1", "train.eval_every=100",
    "train.save_every=100", "train.warmup_steps=1", "train.precision=fp32", "train.lr=3e-3",
    "peft.quantize_base=nf4", "peft.target_modules=[all-linear]",
]  # fmt: skip
STAGE_FAST = {
    "sft": ["data.max_eval_examples=8"],
    "reward": ["data.val_fraction=0.25"],
    "dpo": [],
    "kto": ["dpo.loss=kto"],
    "ppo": ["ppo.rollout_size=4", "ppo.minibatches=1", "ppo.ppo_epochs=1", "ppo.max_new_tokens=4"],
    "grpo": ["grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.max_new_tokens=4"],
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    builtin_base(root / "base")
    towns = ["Oakfield", "Millbrook", "Ashford", "Riverton"]
    rows = [{"prompt": f"Where does person {i} live?", "chosen": towns[i % 4], "rejected": f"{towns[i % 4]} or maybe"}
            for i in range(16)]  # fmt: skip
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(dirs: Path, stage: str, out: Path, *extra: str) -> int:
    name = "dpo" if stage == "kto" else stage
    data = [f"data.path={dirs / 'prefs.jsonl'}"] if stage in ("reward", "dpo", "kto") else []
    return main([name, f"model.path={dirs / 'base'}", f"out_dir={out}", *FAST, *STAGE_FAST[stage], *data, *extra])


def quantized(monkeypatch) -> list[list[str]]:
    """The weights held in NF4 when a model is readied for training (`train.prepare.prepare_model`), one list a
    call, named as in the GPT that holds them (PPO's policy is `policy.` in its actor-critic)."""
    calls, real = [], prepare.quantized_weights

    def spy(model):
        names = real(model)
        calls.append([n[n.index("blocks.") :] if "blocks." in n else n for n in names])
        return names

    monkeypatch.setattr(prepare, "quantized_weights", spy)
    return calls


@pytest.mark.parametrize("stage", list(STAGE_FAST))
def test_each_stage_trains_over_an_nf4_base_and_saves_the_base_as_loaded(dirs, tmp_path, monkeypatch, stage):
    """Every linear weight of the blocks is held in NF4 while the stage trains (its reference, where it has one,
    is the same policy with the adapters disabled), in fp32 or bf16; the saved model file is the loaded one, byte
    for byte, and the adapter beside it has learned something."""
    calls = quantized(monkeypatch)
    method = "dora" if stage == "dpo" else "lora"
    # under bf16 the embedding and tied head are held in bf16 too (train/frozen.py), and must be saved as loaded
    half = ["train.precision=bf16"] if stage in ("sft", "ppo", "grpo") else []
    assert _run(dirs, stage, tmp_path, f"peft.method={method}", *half) == 0
    n_linear = 7 * 2  # q, k, v, o, gate, up, down in each of the builtin base's two blocks
    assert len(calls) == 1 and len(calls[0]) == n_linear, calls
    assert all(name.endswith("_proj.weight") for name in calls[0])
    final = tmp_path / "final"
    # the reward model too: not merged (into the original W it would score otherwise than it trained)
    assert digest(final / "model.safetensors") == digest(dirs / "base" / "model.safetensors")
    adapter = load_file(final / "adapter.safetensors")
    assert sum("lora_B" in k for k in adapter) == n_linear
    if stage != "grpo":  # (GRPO's rewards on a random base can tie in every group: no gradient)
        assert any("lora_B" in k and float(v.abs().sum()) > 0 for k, v in adapter.items())
    loaded = load_model(final)  # as it trained: the same weights held in NF4, the adapter as saved
    assert sorted(quantized_weights(loaded)) == sorted(calls[0])
    held = loaded.state_dict()
    assert all(torch.equal(held[k], v) for k, v in adapter.items())  # DoRA's magnitudes too, not reset
    if stage == "reward":  # what PPO and GRPO load scores as the reward model trained
        _scores_as_trained(final, dirs / "base", calls[0])
    assert trace(tmp_path, "loss")  # the losses were logged


def test_ppo_separate_critic_over_an_nf4_base_shares_it_and_trains_its_own_adapter(dirs, tmp_path, monkeypatch):
    """PPO's separate critic over a QLoRA policy holds the policy's NF4 weights themselves, not a dense copy of
    the model, and trains only its own adapter (and the value head): its LoRA B moves off zero while the saved
    policy is the base as loaded plus the policy's adapter."""
    from llmstages.stages import ppo

    seen, real = {}, ppo.separate_critic

    def spy(policy):
        critic = real(policy)
        nf4 = [[m for m in model.modules() if isinstance(m, NF4Weight)] for model in (policy, critic)]
        seen["shared"] = len(nf4[0]) == 7 * 2 and all(a is b for a, b in zip(*nf4))
        seen["trainable"] = [n for n, p in critic.named_parameters() if p.requires_grad]
        seen["critic"] = critic
        return critic

    monkeypatch.setattr(ppo, "separate_critic", spy)
    half = ["train.precision=bf16"]  # the embedding and head held in bf16 too: shared as well
    assert _run(dirs, "ppo", tmp_path, "peft.method=lora", "ppo.critic=separate", "ppo.value_lr=3e-3", *half) == 0
    assert seen["shared"]
    assert seen["trainable"] and all(".lora_" in n for n in seen["trainable"]), seen["trainable"]
    b = [p for n, p in seen["critic"].named_parameters() if "lora_B" in n]
    assert len(b) == 7 * 2 and any(float(p.abs().sum()) > 0 for p in b)
    assert digest(tmp_path / "final" / "model.safetensors") == digest(dirs / "base" / "model.safetensors")


def _scores_as_trained(final: Path, base: Path, quantized: list[str]) -> None:
    """`load_reward_model(final)` scores as the reward model trained: the base with each quantized weight through
    the NF4 round trip (torchao's bit for bit with its levels, tests/peft/test_nf4.py) plus s B A of the saved
    adapter, and the saved head (1e-4)."""
    from llmstages.model.heads import RewardModel
    from llmstages.store.heads import HEAD_FILE, load_reward_model

    ref = RewardModel(load_model(base)).eval()
    ref.head.load_state_dict(load_file(final / HEAD_FILE))
    adapter = load_file(final / "adapter.safetensors")
    cfg = json.loads((final / "adapter_config.json").read_text())
    with torch.no_grad():
        for name in quantized:
            w = ref.backbone.get_parameter(name)
            nf4_w = NF4Weight.quantize(w.detach()).dequantize()
            a, b = (adapter[name.removesuffix("weight") + f"lora_{x}.weight"] for x in "AB")
            w.copy_(nf4_w + cfg["alpha"] / cfg["rank"] * b @ a)
        ids = torch.randint(3, ref.backbone.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        got, want = load_reward_model(final).eval()(ids, mask), ref(ids, mask)
    assert (got - want).abs().max() < 1e-4, (got, want)


def _nf4_base(hf_model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model with every linear weight of its blocks replaced by torchao's NF4 round trip of it
    (blocks of 64; scales double-quantized in the groups ours chooses, at most 256 to a group)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    with torch.no_grad():
        for name, m in hf_model.named_modules():
            if isinstance(m, torch.nn.Linear) and "layers." in name:
                group = NF4Weight.quantize(m.weight).scale_group
                m.weight.copy_(to_nf4(m.weight.detach().clone(), 64, group).get_original_weight())
    return hf_model


def test_final_model_loads_as_trained_and_exports_to_peft_and_merged(tmp_path, monkeypatch):
    """A QLoRA SFT on a Hugging Face Llama. final/ loads as it trained: transformers + peft over a base that
    torchao quantized to NF4 computes its logits. Loaded with the base as saved (quantized=False), and exported to
    peft, transformers + peft over the original base computes ours (within 1e-4). `export --format hf` merges into
    the original weights; `--merge-base nf4` into the NF4 base, and transformers then computes the model as it
    trained."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torchao")
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    # torchao's levels are the paper's rounded to four decimals: with them, our NF4 is torchao's bit for bit
    monkeypatch.setattr(nf4, "NF4_LEVELS", to_nf4(torch.ones(64, 64), 64, 64).nf4.tolist())
    base = save_hf(hf_model("llama"), tmp_path / "hf", tiny_tokenizer())
    argv = ["sft", f"model.path={base}", f"out_dir={tmp_path / 'run'}", *FAST, "peft.method=lora"]
    assert main(argv) == 0
    final = tmp_path / "run" / "final"
    out = {name: tmp_path / name for name in ("adapter", "merged", "merged_nf4")}
    assert main(["export", "--model", str(final), "--format", "peft", "--out", str(out["adapter"])]) == 0
    assert main(["export", "--model", str(final), "--out", str(out["merged"])]) == 0
    assert main(["export", "--model", str(final), "--out", str(out["merged_nf4"]), "--merge-base", "nf4"]) == 0
    as_trained, as_saved = load_model(final).eval(), load_model(final, quantized=False).eval()

    def hf(path: Path) -> torch.nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(path).eval()

    theirs = peft.PeftModel.from_pretrained(hf(base), out["adapter"]).eval()
    theirs_nf4 = peft.PeftModel.from_pretrained(_nf4_base(hf(base)), out["adapter"]).eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        trained, saved = as_trained(x), as_saved(x)
        assert (theirs_nf4(x).logits - trained).abs().max() < 1e-4
        assert (theirs(x).logits - trained).abs().max() > 1e-2  # the NF4 base is not the original
        assert (theirs(x).logits - saved).abs().max() < 1e-4
        assert (hf(out["merged"])(x).logits - saved).abs().max() < 1e-4
        assert (hf(out["merged_nf4"])(x).logits - trained).abs().max() < 1e-4
        assert (hf(base)(x).logits - saved).abs().max() > 1e-4


def test_merge_base_nf4_is_refused_where_there_is_no_nf4_base(dirs, tmp_path, capsys):
    argv = ["sft", f"model.path={dirs / 'base'}", f"out_dir={tmp_path / 'run'}", *FAST, "peft.method=lora"]
    assert main([*argv, "peft.quantize_base=none"]) == 0
    capsys.readouterr()
    final, out = tmp_path / "run" / "final", tmp_path / "out"
    err = cli_error(capsys, ["export", "--model", str(final), "--out", str(out), "--merge-base", "nf4"])
    assert "holds no adapter trained over an NF4 base" in err
    err = cli_error(
        capsys, ["export", "--model", str(final), "--format", "peft", "--out", str(out), "--merge-base", "nf4"]
    )
    assert "--merge-base nf4 is for --format merged, hf or gguf" in err
    assert not out.exists()


RUNNER = """
import os, signal, sys
from llmstages.train import loop

save = loop.Trainer.save


def save_then_die(self):
    path = save(self)
    if self.state.step == int(os.environ["KILL_AFTER_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9, right after the checkpoint landed
    return path


loop.Trainer.save = save_then_die
from llmstages.cli import main

sys.exit(main(sys.argv[1:]))
"""


def run_killed(tmp_path: Path, argv: list[str], kill_after: int | None) -> subprocess.CompletedProcess:
    """`llmstages argv` in a process of its own (one thread), SIGKILLed right after writing the checkpoint of step
    `kill_after` (None: not killed)."""
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "KILL_AFTER_STEP": str(kill_after or -1)}
    return subprocess.run([sys.executable, str(runner), *argv], env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    "extra",
    [
        ["peft.method=lora"],
        ["peft.method=none", "peft.quantize_base=none", "train.optimizer=adamw8bit"],
        ["peft.method=none", "peft.quantize_base=none", "train.optimizer=adamw4bit"],
    ],
    ids=["qlora", "full-adamw8bit", "full-adamw4bit"],
)
def test_exact_resume_after_kill_9(dirs, tmp_path, extra):
    """QLoRA, 8-bit and 4-bit AdamW: a run killed with SIGKILL after its step-3 checkpoint and resumed logs the
    losses of the uninterrupted run, and ends with the same weights."""
    argv = ["sft", f"model.path={dirs / 'base'}", *FAST, "train.max_steps=6", "train.save_every=3", *extra]
    straight = run_killed(tmp_path, [*argv, f"out_dir={tmp_path / 'a'}"], None)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_killed(tmp_path, [*argv, f"out_dir={tmp_path / 'b'}"], 3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "b" / "final").exists()
    resumed = run_killed(tmp_path, [*argv, f"out_dir={tmp_path / 'b'}", "resume=true"], None)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r[0] for r in trace(tmp_path / "b", "loss")] == [1, 2, 3, 4, 5, 6]
    assert trace(tmp_path / "b", "loss") == trace(tmp_path / "a", "loss")
    a, b = (load_model(tmp_path / run / "final").state_dict() for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_settings_that_do_not_go_with_nf4_are_refused(dirs, tmp_path, capsys):
    run = ["sft", f"model.path={dirs / 'base'}", f"out_dir={tmp_path / 'x'}", *FAST]
    assert "set peft.method=lora or dora (got adapter)" in cli_error(capsys, [*run, "peft.method=adapter"])
    assert "set peft.method=lora or dora (got none)" in cli_error(capsys, [*run, "peft.method=none"])
    err = cli_error(capsys, [*run, "peft.method=lora", "dist.strategy=fsdp"])
    assert "dist.strategy none, ddp or zero1, got fsdp" in err
    assert "peft.quantize_base must be one of" in cli_error(
        capsys, [*run, "peft.method=lora", "peft.quantize_base=int4"]
    )
    assert not (tmp_path / "x").exists()
