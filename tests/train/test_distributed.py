"""Distributed training on CPU with gloo and 2 processes: every strategy's losses equal the single-process run
with the same global batch, sharded checkpoints resume exactly (also on one process), a LoRA adapter saved
under fsdp is complete, a failing rank ends the job, and 2 "nodes" rendezvous on localhost.

Each `torchrun` launch runs several jobs (tests/train/dist_worker.py): start-up costs seconds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from llmstages.cli import main
from llmstages.monitor.metrics import read_metrics
from tests.helpers import builtin_base

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "train" / "dist_worker.py"
TOL = 1e-5
# train.eps=1e-6: with AdamW's default 1e-8, an element whose gradient is ~1e-9 moves by a large part of the LR
# either way, so reduction-order round-off in it showed as one weight 1.5e-5 off (measured); at 1e-6 every strategy
# ends within 5e-7 of the single process.
PRE = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.block_size=64",
    "data.builtin_size_mb=0.05", "data.vocab_size=400", "data.workers=1", "train.max_steps=6", "train.seq_len=32",
    "train.log_every=1", "train.eval_every=3", "train.save_every=3", "train.keep_checkpoints=3",
    "train.warmup_steps=2", "train.lr=3e-3", "train.precision=fp32", "train.eval_batches=2", "train.eps=1e-6",
]  # fmt: skip


def launch(
    jobs: list[dict], where: Path, nproc: int = 2, timeout: int = 600
) -> tuple[subprocess.CompletedProcess, list]:
    """Run `jobs` under torchrun with `nproc` CPU processes; (the finished process, rank 0's exit codes)."""
    spec = where / f"jobs_{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(jobs))
    # faulthandler: a rank that dies of a signal prints where (one SIGSEGV in a launch was seen, not reproduced)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
    # its own rendezvous port: a launch never meets a straggler of an earlier one on torchrun's default 29500
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           str(WORKER), str(spec)]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    rank0 = Path(f"{spec}.rank0")
    return r, json.loads(rank0.read_text()) if rank0.is_file() else []


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def assert_same(run: Path, ref: Path, what: str) -> None:
    got, want = losses(run), losses(ref)
    assert len(got) == len(want) == 6, (what, got)
    worst = max(abs(a - b) for a, b in zip(got, want))
    assert worst < TOL, f"{what}: losses differ by {worst:.2e}\n{got}\n{want}"


def assert_same_weights(a: Path, b: Path, name: str = "model.safetensors") -> None:
    x, y = load_file(str(a / name)), load_file(str(b / name))
    assert sorted(x) == sorted(y)
    for k in x:
        assert (x[k] - y[k]).abs().max() < TOL, k


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
    """The single-process reference (8 rows a step) and one launch with every strategy and a sharded resume."""
    root = tmp_path_factory.mktemp("dist_pretrain")
    assert main(["pretrain", f"out_dir={root / 'ref'}", *PRE, "train.batch_size=8"]) == 0
    runs = {
        "ddp": ["dist.strategy=ddp", "train.batch_size=4"],
        "zero1": ["dist.strategy=zero1", "train.batch_size=4"],
        "fsdp": ["dist.strategy=fsdp", "train.batch_size=4"],
        "fsdp_zero2": ["dist.strategy=fsdp", "dist.reshard_after_forward=false", "train.batch_size=4"],
        "tp": ["dist.strategy=tp", "train.batch_size=8"],
        "pp_1f1b": ["dist.strategy=pp", "dist.schedule=1f1b", "train.batch_size=8"],
        "pp_gpipe": ["dist.strategy=pp", "dist.schedule=gpipe", "dist.microbatches=4", "train.batch_size=8"],
    }
    jobs = [{"argv": ["pretrain", f"out_dir={root / name}", *PRE, *extra]} for name, extra in runs.items()]
    split = root / "fsdp_split"  # the fsdp run again, its last checkpoint removed, resumed from step 3
    jobs += [
        {"argv": ["pretrain", f"out_dir={split}", *PRE, *runs["fsdp"]]},
        {"remove": [str(split / "checkpoints" / "step_6"), str(split / "final")]},
        {"argv": ["pretrain", f"out_dir={split}", *PRE, *runs["fsdp"], "resume=true"]},
    ]
    r, codes = launch(jobs, root)
    assert r.returncode == 0 and codes == [0] * (len(runs) + 2), r.stderr[-3000:]
    return root, r


@pytest.mark.parametrize("name", ["ddp", "zero1", "fsdp", "fsdp_zero2", "tp", "pp_1f1b", "pp_gpipe"])
def test_pretrain_strategy_equals_one_process(pretrain_runs, name):
    root, _ = pretrain_runs
    assert_same(root / name, root / "ref", name)
    assert_same_weights(root / name / "final", root / "ref" / "final")  # the exported model is whole
    if name in ("fsdp", "tp", "pp_1f1b"):
        assert (root / name / "checkpoints" / "step_3" / "dcp" / ".metadata").is_file()  # sharded checkpoint


def test_sharded_checkpoint_resumes_exactly(pretrain_runs):
    root, r = pretrain_runs
    assert_same(root / "fsdp_split", root / "ref", "fsdp resumed at step 3")
    assert "Traceback" not in r.stderr and "Abort" not in r.stderr  # every process exited cleanly


@pytest.mark.parametrize("name", ["fsdp", "pp_1f1b"])
def test_two_rank_checkpoint_resumes_on_one_process(pretrain_runs, tmp_path, name):
    root, _ = pretrain_runs
    run = tmp_path / name
    shutil.copytree(root / name, run)
    shutil.rmtree(run / "checkpoints" / "step_6")
    shutil.rmtree(run / "final")
    assert main(["pretrain", f"out_dir={run}", *PRE, "train.batch_size=8", "resume=true"]) == 0
    assert_same(run, root / "ref", f"{name} checkpoint resumed on 1 process")


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    """LoRA SFT and DPO: the single-process reference and ddp/fsdp in one launch; the other stages under ddp."""
    root = tmp_path_factory.mktemp("dist_finetune")
    base = builtin_base(root / "base")
    towns = ["Oakfield", "Millbrook", "Ashford", "Riverton"]
    rows = [{"prompt": f"Where does person {i} live?", "chosen": towns[i % 4], "rejected": f"{towns[i % 4]} or maybe"}
            for i in range(40)]  # fmt: skip
    prefs = root / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [
        "train.max_steps=6", "train.seq_len=48", "train.log_every=1", "train.eval_every=6", "train.save_every=3",
        "train.warmup_steps=1", "train.precision=fp32", "train.lr=3e-3", "peft.method=lora", "peft.rank=4",
    ]  # fmt: skip
    sft = ["sft", f"model.path={base}", *common, "data.max_eval_examples=4"]
    dpo = ["dpo", f"model.path={base}", f"data.path={prefs}", *common]
    adapter = [*sft, "peft.method=adapter", "peft.bottleneck=8"]
    for argv, name in ((sft, "sft_ref"), (dpo, "dpo_ref"), (adapter, "adapter_ref")):
        assert main([*argv, f"out_dir={root / name}", "train.batch_size=8"]) == 0
    jobs = [{"argv": [*adapter, f"out_dir={root / 'adapter_fsdp'}", "dist.strategy=fsdp", "train.batch_size=4"]}]
    for strategy in ("ddp", "fsdp"):
        for argv, stage in ((sft, "sft"), (dpo, "dpo")):
            extra = [f"out_dir={root / f'{stage}_{strategy}'}", f"dist.strategy={strategy}", "train.batch_size=4"]
            jobs.append({"argv": [*argv, *extra]})
    small = ["train.max_steps=2", "train.eval_every=2", "train.save_every=2", f"model.path={base}", "peft.method=lora",
             "train.precision=fp32", "data.heldout_people=8"]  # fmt: skip
    grpo = ["grpo", "grpo.prompts_per_step=2", "grpo.group_size=2", *small]
    ppo = ["ppo", "ppo.rollout_size=4", "ppo.minibatches=2", "ppo.ppo_epochs=1", *small]
    jobs += [
        {"argv": ["reward", f"out_dir={root / 'reward_ddp'}", f"data.path={prefs}", "train.batch_size=4", *small[:-1],
                  "dist.strategy=ddp"]},
        {"argv": [*grpo, f"out_dir={root / 'grpo_ddp'}", "dist.strategy=ddp"]},
        {"argv": [*grpo, f"out_dir={root / 'grpo_fsdp'}", "dist.strategy=fsdp"]},
        {"argv": [*ppo, f"out_dir={root / 'ppo_zero1'}", "dist.strategy=zero1"]},
        {"argv": [*ppo, f"out_dir={root / 'ppo_fsdp'}", "dist.strategy=fsdp"]},
    ]  # fmt: skip
    # PPO under ddp stopped after the first update of a rollout and resumed: each rank's share of the rollout in
    # progress is kept in the checkpoint.
    each = ["dist.strategy=ddp", "train.save_every=1", "train.keep_checkpoints=3"]
    split = root / "ppo_resumed"
    jobs += [
        {"argv": [*ppo, f"out_dir={root / 'ppo_straight'}", *each]},
        {"argv": [*ppo, f"out_dir={split}", *each]},
        {"remove": [str(split / "checkpoints" / "step_2"), str(split / "final")]},
        {"argv": [*ppo, f"out_dir={split}", *each, "resume=true"]},
    ]
    r, codes = launch(jobs, root)
    assert r.returncode == 0 and codes == [0] * sum("argv" in j for j in jobs), r.stderr[-3000:]
    return root


@pytest.mark.parametrize(
    ("stage", "strategy"),
    [("sft", "ddp"), ("sft", "fsdp"), ("dpo", "ddp"), ("dpo", "fsdp"), ("adapter", "fsdp")],
)
def test_peft_finetuning_equals_one_process(finetune_runs, stage, strategy):
    root = finetune_runs
    assert_same(root / f"{stage}_{strategy}", root / f"{stage}_ref", f"{stage} {strategy}")
    # The adapter written from the sharded run holds every tensor with the single-process values.
    got = load_file(str(root / f"{stage}_{strategy}" / "final" / "adapter.safetensors"))
    want = load_file(str(root / f"{stage}_ref" / "final" / "adapter.safetensors"))
    n = 16 if stage == "adapter" else 8  # LoRA: q and v, A and B; adapters: after attention and MLP, 2 x 2 linears
    assert sorted(got) == sorted(want) and len(want) == n, sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and (got[k] - want[k]).abs().max() < TOL, k
        assert want[k].abs().max() > 0


@pytest.mark.parametrize("run", ["reward_ddp", "grpo_ddp", "grpo_fsdp", "ppo_zero1", "ppo_fsdp"])
def test_the_other_stages_run_distributed(finetune_runs, run):
    root = finetune_runs
    assert (root / run / "final" / "model.safetensors").is_file()
    assert len(losses(root / run)) == 2 and all(map(math.isfinite, losses(root / run)))


def test_ppo_resumes_mid_rollout_under_ddp(finetune_runs):
    straight, resumed = losses(finetune_runs / "ppo_straight"), losses(finetune_runs / "ppo_resumed")
    assert len(straight) == 2 and resumed == straight


def test_a_failing_rank_ends_the_job(tmp_path):
    argv = ["pretrain", f"out_dir={tmp_path / 'run'}", *PRE, "train.batch_size=4", "dist.strategy=ddp"]
    t0 = time.monotonic()
    r, _ = launch([{"argv": argv, "fail_rank": 1, "fail_step": 2}], tmp_path, timeout=240)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 120  # not the 300 s collective timeout
    assert "llmstages: error (rank 1): RuntimeError: injected failure at step 3" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost(pretrain_runs, tmp_path):
    root, _ = pretrain_runs
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps([{"argv": ["pretrain", f"out_dir={tmp_path / 'run'}", *PRE, "train.batch_size=4",
                                          "dist.strategy=ddp"]}]))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=llmstages-test",
                str(WORKER),
                str(spec),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert_same(tmp_path / "run", root / "ref", "2 nodes x 1 process")


@pytest.mark.parametrize(
    ("stage", "extra", "message"),
    [
        ("sft", ["dist.strategy=tp"], "dist.strategy=tp is supported by pretrain only"),
        ("pretrain", ["dist.strategy=fsdp+tp"], "needs a world size that is a multiple of dist.tp_size=2"),
        ("pretrain", ["dist.strategy=zero3"], "dist.strategy must be one of auto, none"),
        ("dpo", ["dist.strategy=deepspeed"], "dist.strategy=deepspeed is not built"),
        ("pretrain", ["dist.strategy=fsdp", "dist.cpu_offload=true"], "already on the CPU"),
        ("pretrain", ["dist.strategy=ddp", "dist.backend=nccl"], "dist.backend=nccl needs CUDA"),
        ("pretrain", ["dist.strategy=pp", "dist.microbatches=1"], "a pipeline of 2 stages needs at least 2 micro"),
    ],
)
def test_unsupported_settings_are_refused(tmp_path, monkeypatch, capsys, stage, extra, message):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    argv = [stage, f"out_dir={tmp_path / 'run'}", "model.path=none", *extra] if stage != "pretrain" else [
        stage, f"out_dir={tmp_path / 'run'}", *PRE, *extra]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_strategy_without_a_launcher_is_refused(tmp_path, capsys):
    assert main(["pretrain", f"out_dir={tmp_path / 'run'}", *PRE, "dist.strategy=fsdp"]) == 2
    assert "needs a launcher: torchrun --nproc_per_node=N -m llmstages pretrain" in capsys.readouterr().err


def test_fsdp_with_tensor_parallel_on_four_processes(pretrain_runs, tmp_path):
    root, _ = pretrain_runs  # 2 data-parallel groups of 2 tensor-parallel ranks, 4 rows per group
    argv = ["pretrain", f"out_dir={tmp_path / 'run'}", *PRE, "train.batch_size=4", "dist.strategy=fsdp+tp"]
    r, codes = launch([{"argv": argv}], tmp_path, nproc=4)
    assert r.returncode == 0 and codes == [0], r.stderr[-3000:]
    assert_same(tmp_path / "run", root / "ref", "fsdp+tp")
    assert_same_weights(tmp_path / "run" / "final", root / "ref" / "final")


def test_three_stage_pipeline_with_a_tied_head(tmp_path):
    # The embedding lives on the first stage and the tied LM head on the last; the middle stage holds neither.
    three = [a for a in PRE if not a.startswith("model.n_layers")] + ["model.n_layers=3", "train.batch_size=6"]
    assert main(["pretrain", f"out_dir={tmp_path / 'ref'}", *three]) == 0
    argv = ["pretrain", f"out_dir={tmp_path / 'pp'}", *three, "dist.strategy=pp", "dist.microbatches=3"]
    r, codes = launch([{"argv": argv}], tmp_path, nproc=3)
    assert r.returncode == 0 and codes == [0], r.stderr[-3000:]
    assert_same(tmp_path / "pp", tmp_path / "ref", "pp over 3 stages")
