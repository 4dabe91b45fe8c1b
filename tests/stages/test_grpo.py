"""The GRPO stage end to end: rollouts, group advantages, the oracle or a reward model as reward, resume."""

from __future__ import annotations

import json
import math

import pytest

from llmstages.cli import main
from llmstages.data.builtin import builtin_corpus
from llmstages.data.tokenizer import train_bpe
from llmstages.model import GPT, preset
from llmstages.monitor.metrics import read_metrics
from llmstages.store import save_model
from tests.helpers import builtin_base, stop_after_step, trace

FAST = [
    "train.max_steps=6", "train.log_every=1", "train.eval_every=3", "train.save_every=100", "train.warmup_steps=1",
    "train.precision=fp32", "train.lr=1e-3", "grpo.group_size=4", "grpo.prompts_per_step=4", "grpo.max_new_tokens=4",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return builtin_base(tmp_path_factory.mktemp("grpo") / "base")


def _grpo(base, out, *extra):
    return main(["grpo", f"model.path={base}", f"out_dir={out}", *FAST, *extra])


@pytest.mark.parametrize("method", ["lora", "none"])
def test_runs_and_logs(base_dir, tmp_path, method):
    assert _grpo(base_dir, tmp_path, f"peft.method={method}") == 0
    records = read_metrics(tmp_path)
    steps = [r for r in records if "reward_mean" in r]
    assert len(steps) == 6
    assert {"kl_k3", "clip_fraction", "zero_advantage_groups", "response_length", "rollout_tokens_per_s"} <= set(
        steps[0]
    )
    assert steps[0]["kl_k3"] == pytest.approx(0.0, abs=1e-6)  # the first update starts at the reference
    # every KL metric names its estimator; k3 = (r - 1) - log r is non-negative on every batch
    kls = {k for r in records for k in r if "kl" in k}
    assert kls == {"kl_k3"} and all(r["kl_k3"] >= 0 for r in steps)
    assert any("eval_reward" in r for r in records) and (tmp_path / "final/model.safetensors").is_file()


def test_exact_resume(base_dir, tmp_path, monkeypatch):
    assert _grpo(base_dir, tmp_path / "a", "peft.method=lora") == 0
    stop_after_step(monkeypatch, 2)
    assert _grpo(base_dir, tmp_path / "b", "peft.method=lora") == 130
    monkeypatch.undo()
    assert _grpo(base_dir, tmp_path / "b", "peft.method=lora", "resume=true") == 0
    assert trace(tmp_path / "b", "reward_mean", "loss") == trace(tmp_path / "a", "reward_mean", "loss")


def test_bad_reward_sources(base_dir, tmp_path, capsys):
    assert _grpo(base_dir, tmp_path / "x", "reward.fn=no_such_module:score") == 2
    assert "reward.fn 'no_such_module:score' does not import" in capsys.readouterr().err
    assert _grpo(base_dir, tmp_path / "x", f"reward.model={base_dir}") == 2
    assert "not a reward model" in capsys.readouterr().err
    from llmstages.model.heads import ScalarHead
    from llmstages.store.heads import save_head

    other_tok = train_bpe(builtin_corpus(1, 0.1), 500)
    rm_dir = save_model(GPT(preset("llama_tiny", vocab_size=other_tok.vocab_size, n_layers=1, d_model=32, n_heads=2,
                                   n_kv_heads=1)), tmp_path / "rm", other_tok)  # fmt: skip
    save_head(ScalarHead(32), rm_dir, kind="reward")
    assert _grpo(base_dir, tmp_path / "x", f"reward.model={rm_dir}") == 2
    assert "its tokenizer differs from the policy's" in capsys.readouterr().err
    empty = tmp_path / "p.jsonl"
    empty.write_text("\n")
    assert _grpo(base_dir, tmp_path / "x", f"data.path={empty}") == 2
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_long_prompts_are_cut_from_the_left_to_leave_room_for_the_replies(base_dir, tmp_path, capsys):
    """A prompt longer than the model's context (64) less grpo.max_new_tokens keeps its end, and the run samples and
    trains; a max_new_tokens that leaves no room for a prompt is refused before anything is written."""
    from llmstages.data.chat import prompt_ids
    from llmstages.store import load_tokenizer

    long = "Ada lives in Oakfield and keeps a grey cat. " * 10 + "Where does Ada live?"
    assert len(prompt_ids([{"role": "user", "content": long}], load_tokenizer(base_dir))) > 64
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": long}) + "\n" + json.dumps({"prompt": "Where does Bram live?"}) + "\n")
    run = ["grpo.prompts_per_step=2", "train.max_steps=1", "data.val_fraction=0"]  # both prompts in training
    assert _grpo(base_dir, tmp_path / "run", f"data.path={data}", *run) == 0
    assert "grpo: 2 prompts (1 cut from the left to leave room for 4 new tokens)" in capsys.readouterr().out
    start = read_metrics(tmp_path / "run")[0]
    assert start["truncated_examples"] == 1 and start["truncated_eval_prompts"] == 1 and "eval_reward" in start
    assert _grpo(base_dir, tmp_path / "x", f"data.path={data}", "grpo.max_new_tokens=64") == 2
    err = capsys.readouterr().err
    assert "grpo.max_new_tokens=64 leaves no room for a prompt in the model's context of 64 tokens" in err
    assert not (tmp_path / "x").exists()


COLUMN_FNS = '''
CALLS = []


def level(prompts, responses, ended, answer, level):
    """Scores each reply by its row's `level` column; records what it was handed."""
    CALLS.append((list(prompts), list(answer), list(level)))
    return [float(x) for x in level]


def half(prompts, responses, ended):
    """A function that names no column: called as before."""
    return [0.5] * len(responses)


def seen(prompts, responses, ended, **columns):
    """Takes **kwargs: handed every column."""
    assert sorted(columns) == ["answer", "level"], columns
    return [0.0] * len(responses)
'''


def column_reward_run(tmp_path, name: str, rows: int = 20) -> tuple[str, list[str], object]:
    """A prompt file of `rows` questions 'What is i?' with columns answer=str(i), level=i % 5, and a module `name` of
    reward functions on sys.path: (the data override, the reward overrides, the imported module)."""
    import importlib
    import sys

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}?", "answer": str(i), "level": i % 5}) + "\n"
                            for i in range(rows)))  # fmt: skip
    (tmp_path / f"{name}.py").write_text(COLUMN_FNS)
    sys.path.insert(0, str(tmp_path))
    module = importlib.import_module(name)
    sys.path.remove(str(tmp_path))
    fns = f"reward.fns=[{name}:level,{name}:half,{name}:seen]"
    return f"data.path={data}", [fns, "reward.weights=[2.0,1.0,3.0]", "data.val_fraction=0.2"], module


def check_column_calls(calls: list, batch: int, repeat: int, records: list[dict]) -> None:
    """Every call's columns are aligned with its prompts; training calls (`batch` replies, each prompt `repeat`
    times in a row) never see the held-out prompts the evaluation calls score; the logged reward/level and the
    weighted total (2 level + 0.5) are what the function returned; the evaluation's reward is exact too."""
    for prompts, answer, level in calls:
        assert prompts == [f"What is {a}?" for a in answer] and level == [int(a) % 5 for a in answer]
    train = [c for c in calls if len(c[0]) == batch]
    held = [c for c in calls if len(c[0]) == 4]  # 20 rows x 0.2
    assert train and held
    for prompts, _, _ in train:
        assert all(prompts[k] == prompts[k - k % repeat] for k in range(len(prompts)))
    assert not {p for c in train for p in c[0]} & {p for c in held for p in c[0]}
    steps = [r for r in records if "reward/level" in r]
    assert len(steps) == len(train)
    for r, (_, _, level) in zip(steps, train):
        assert r["reward/level"] == pytest.approx(sum(level) / len(level))
        assert r["reward/half"] == 0.5 and r["reward/seen"] == 0.0
        assert r["reward_mean"] == pytest.approx(2 * r["reward/level"] + 1.0 * 0.5 + 3.0 * 0.0)
    evals = [r["eval_reward"] for r in records if "eval_reward" in r]
    assert evals and all(e == pytest.approx(2 * sum(held[0][2]) / 4 + 0.5) for e in evals)


def test_columns_reach_the_reward_functions_and_each_is_logged(base_dir, tmp_path):
    data, rewards, module = column_reward_run(tmp_path, "grpo_column_fns")
    assert _grpo(base_dir, tmp_path / "run", data, *rewards, "train.max_steps=3", "peft.method=lora") == 0
    check_column_calls(module.CALLS, 16, 4, read_metrics(tmp_path / "run"))  # 4 prompts x group_size 4


def test_builtin_rewards_by_name(base_dir, tmp_path):
    data, _, _ = column_reward_run(tmp_path, "grpo_builtin_fns")
    fns = "reward.fns=[llmstages.rewards:accuracy,llmstages.rewards:format]"
    assert _grpo(base_dir, tmp_path / "run", data, fns, "train.max_steps=1") == 0
    step = next(r for r in read_metrics(tmp_path / "run") if "reward_mean" in r)
    assert 0 <= step["reward/accuracy"] <= 1 and 0 <= step["reward/format"] <= 1
    assert step["reward_mean"] == pytest.approx(step["reward/accuracy"] + step["reward/format"])


def test_the_legacy_objective_is_dapo_of_the_family(base_dir, tmp_path):
    """The stage's default (grpo_loss, summed over tokens, divided by the step's token count) and the family's
    policy_loss with bnpo (the same normalisation for one micro-batch a step) train the same run: the two code
    paths agree step by step (fp32)."""
    short = ["train.max_steps=3", "train.eval_every=100", "peft.method=lora"]
    assert _grpo(base_dir, tmp_path / "dapo", *short) == 0
    assert _grpo(base_dir, tmp_path / "bnpo", *short, "grpo.loss_type=bnpo") == 0
    a, b = trace(tmp_path / "dapo", "reward_mean", "loss"), trace(tmp_path / "bnpo", "reward_mean", "loss")
    assert len(a) == len(b) == 3
    for (_, ra, la), (_, rb, lb) in zip(a, b):
        assert ra == rb and la == pytest.approx(lb, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(
    "options",
    [
        ["grpo.loss_type=grpo", "grpo.advantage=rloo"],
        ["grpo.loss_type=dr_grpo", "grpo.clip_high=0.28", "grpo.kl_beta=0"],
        ["grpo.loss_type=gspo", "grpo.advantage=reinforce_pp"],
    ],
    ids=["grpo-rloo", "dr_grpo-clip_higher", "gspo-reinforce_pp"],
)
def test_the_family_trains(base_dir, tmp_path, options):
    assert _grpo(base_dir, tmp_path, "train.max_steps=2", "train.eval_every=100", "peft.method=lora", *options) == 0
    steps = [r for r in read_metrics(tmp_path) if "reward_mean" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert {"clip_low_fraction", "clip_high_fraction", "ratio_mean"} <= set(steps[0])
    assert steps[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # one update per rollout: the ratio starts at 1
    assert ("kl_k3" in steps[0]) == ("grpo.kl_beta=0" not in options)


SIGNAL_FNS = '''
import os
import time
from pathlib import Path


def half_signal(prompts, responses, ended):
    """Even-numbered questions score 1 whatever the reply (their groups carry no signal); odd-numbered ones score
    the reply's length in characters. With GRPO_TEST_HOLD naming a path that exists, waits (to be killed there)."""
    hold = os.environ.get("GRPO_TEST_HOLD")
    if hold and Path(hold).exists():
        time.sleep(600)
    return [1.0 if int(p.split()[-1].rstrip("?")) % 2 == 0 else float(len(r)) for p, r in zip(prompts, responses)]
'''


def half_signal_run(tmp_path, name: str) -> list[str]:
    """24 questions 'What is i?' and a module `name` (written into tmp_path, to put on sys.path) whose reward gives
    the even-numbered ones the same score for every reply: the overrides of a run on them."""
    data = tmp_path / "numbers.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}?"}) + "\n" for i in range(24)))
    (tmp_path / f"{name}.py").write_text(SIGNAL_FNS)
    return [f"data.path={data}", f"reward.fn={name}:half_signal", "data.val_fraction=0.2"]


def record_batches(monkeypatch) -> list[dict]:
    """The batches the loss is computed on, recorded (the loop binds grpo_step_loss when the run starts)."""
    from llmstages.stages import grpo

    seen, real = [], grpo.grpo_step_loss

    def recorded(m, batch, g):
        seen.append({k: v.detach().clone() for k, v in batch.items() if k != "stats"})
        return real(m, batch, g)

    monkeypatch.setattr(grpo, "grpo_step_loss", recorded)
    return seen


def test_iterations_train_each_rollout_again_where_the_ratio_moves(base_dir, tmp_path, monkeypatch):
    """grpo.iterations=2: steps 1-2 train on one rollout and steps 3-4 on the next (the same rollout statistics);
    a rollout's first step has ratio 1, its second does not (the policy moved since it sampled), so the clip
    binds there (on the family's path and on the stage's default objective); the loss is finite."""
    monkeypatch.syspath_prepend(str(tmp_path))
    run = half_signal_run(tmp_path, "grpo_signal_iterations")
    seen = record_batches(monkeypatch)
    short = ["train.max_steps=4", "train.eval_every=100", "peft.method=none", "grpo.clip_high=0.28"]
    assert _grpo(base_dir, tmp_path / "run", *run, *short, "grpo.iterations=2") == 0
    steps = [r for r in read_metrics(tmp_path / "run") if "reward_mean" in r]
    assert len(steps) == len(seen) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    moved = [abs(r["ratio_mean"] - 1) > 1e-4 for r in steps]
    assert moved == [False, True, False, True], [r["ratio_mean"] for r in steps]
    assert steps[1]["kl_k3"] > 0
    for a, b in ((0, 1), (2, 3)):
        assert steps[a]["reward_mean"] == steps[b]["reward_mean"]
        assert all(seen[a][k].equal(seen[b][k]) for k in seen[a])  # the same rollout, old log-probs and all
    assert not seen[1]["input_ids"].equal(seen[2]["input_ids"]) or not seen[1]["adv"].equal(seen[2]["adv"])
    # the stage's default objective (grpo_loss): with a larger step the clip binds on the rollout's second update
    default = ["train.max_steps=2", "train.eval_every=100", "peft.method=none", "train.lr=1e-2", "grpo.iterations=2"]
    assert _grpo(base_dir, tmp_path / "default", *run, *default) == 0
    clipped = [r["clip_fraction"] for r in read_metrics(tmp_path / "default") if "reward_mean" in r]
    assert clipped[0] == 0 and clipped[1] > 0


def test_dynamic_sampling_fills_the_batch_with_groups_that_have_signal(base_dir, tmp_path, monkeypatch):
    """Half the prompts give every reply the same reward: dynamic sampling drops those groups and draws more
    prompts until the step has prompts_per_step groups with signal (every group trained on has rewards that
    differ), logging what it dropped and how many rounds it drew; with one round allowed the step trains on the
    groups with signal it has, and logs how many were missing."""
    monkeypatch.syspath_prepend(str(tmp_path))
    run = half_signal_run(tmp_path, "grpo_signal_dynamic")
    seen = record_batches(monkeypatch)
    short = ["train.max_steps=3", "train.eval_every=100", "peft.method=lora", "grpo.dynamic_sampling=true"]
    assert _grpo(base_dir, tmp_path / "run", *run, *short) == 0
    steps = [r for r in read_metrics(tmp_path / "run") if "reward_mean" in r]
    assert len(steps) == len(seen) == 3
    for r, b in zip(steps, seen):
        assert r["missing_groups"] == 0 and b["adv"].numel() == 4 * 4  # prompts_per_step x group_size
        assert bool((b["adv"].view(4, 4).abs().sum(-1) > 0).all()) and r["zero_advantage_groups"] == 0
    assert sum(r["dropped_groups"] for r in steps) > 0 and max(r["sampling_rounds"] for r in steps) >= 2
    assert all(1 <= r["sampling_rounds"] <= 3 for r in steps)

    seen.clear()
    assert _grpo(base_dir, tmp_path / "one", *run, *short, "train.max_steps=1", "grpo.max_sampling_rounds=1") == 0
    (step,) = [r for r in read_metrics(tmp_path / "one") if "reward_mean" in r]
    assert step["sampling_rounds"] == 1 and step["missing_groups"] == step["dropped_groups"] > 0
    assert seen[0]["adv"].numel() == 4 * (4 - step["missing_groups"])


def test_overlong_filter_masks_the_unfinished_replies(base_dir, tmp_path, monkeypatch):
    """Every third reply is made to end with an EOS after 2 tokens; the others reach max_new_tokens unfinished.
    With grpo.overlong_filter the loss counts exactly the finished replies' tokens (the unfinished rows hold no
    target) and overlong_filtered is the unfinished share."""
    from llmstages.stages import grpo
    from llmstages.store import load_tokenizer

    eos, real, drawn = load_tokenizer(base_dir).eos_id, grpo.sample_replies, []

    def some_end(model, tok, prompts, max_new_tokens, temperature, gen):
        replies, _, _ = real(model, tok, prompts, max_new_tokens, temperature, gen)
        replies = [r[:2] + [eos] if k % 3 == 0 else r for k, r in enumerate(replies)]
        ended = [r[-1] == eos for r in replies]
        drawn.append((replies, ended))
        return replies, [tok.decode(r) for r in replies], ended

    monkeypatch.setattr(grpo, "sample_replies", some_end)
    seen = record_batches(monkeypatch)
    short = ["train.max_steps=1", "train.eval_every=100", "peft.method=lora", "grpo.overlong_filter=true"]
    assert _grpo(base_dir, tmp_path / "run", *short) == 0
    [(replies, ended)], [batch] = drawn, seen
    counted = batch["targets"] != -100
    assert 0 < sum(len(r) for r, e in zip(replies, ended) if e) == int(counted.sum()) < sum(map(len, replies))
    for row, r, e in zip(counted, replies, ended):
        assert int(row.sum()) == (len(r) if e else 0)
    (step,) = [r for r in read_metrics(tmp_path / "run") if "reward_mean" in r]
    assert step["overlong_filtered"] == pytest.approx(ended.count(False) / len(ended))


def test_dapo_with_dynamic_sampling_and_iterations_resumes_after_kill_9(base_dir, tmp_path):
    """The issue's run (loss_type=dapo, clip_high=0.28, dynamic_sampling, iterations=2) killed with SIGKILL while it
    samples its third rollout, its newest checkpoint written after step 3, in the middle of the second rollout:
    resumed, it logs the losses, rewards and sampling figures of the uninterrupted run. Every run is a process of
    its own, with the same threads."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from llmstages.train.checkpoint import newest_loadable

    root = Path(__file__).resolve().parents[2]
    run = half_signal_run(tmp_path, "grpo_signal_killed")
    opts = ["grpo.loss_type=dapo", "grpo.clip_high=0.28", "grpo.dynamic_sampling=true", "grpo.iterations=2",
            "train.save_every=3", "train.eval_every=100", "peft.method=lora"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), str(tmp_path)])}

    def start(out: Path, *extra: str, hold: Path | None = None) -> subprocess.Popen:
        argv = [sys.executable, "-m", "llmstages", "grpo", f"model.path={base_dir}", f"out_dir={out}", *FAST, *run,
                *opts, *extra]  # fmt: skip
        hold_env = {"GRPO_TEST_HOLD": str(hold)} if hold else {}
        with open(tmp_path / f"{out.name}{len(extra)}.err", "w") as err:  # what it says, for a failure's message
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env={**env, **hold_env})
        procs.append(proc)
        proc.said = err.name  # type: ignore[attr-defined]
        return proc

    def said(proc: subprocess.Popen) -> str:
        return Path(proc.said).read_text()[-2000:]  # type: ignore[attr-defined]

    a, b, procs = tmp_path / "a", tmp_path / "b", []
    try:
        straight = start(a)
        killed = start(b, hold=b / "checkpoints" / "step_3")  # its reward waits once step_3 is written
        deadline = time.monotonic() + 120
        while not (b / "checkpoints" / "step_3").is_dir():
            assert killed.poll() is None, said(killed)
            assert time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.05)
        time.sleep(0.5)  # step 4 trains on the held rollout; the next rollout's reward waits
        killed.send_signal(signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
        assert newest_loadable(b / "checkpoints").name == "step_3"  # in the middle of rollout 2 (steps 3 and 4)
        assert straight.wait() == 0, said(straight)
        resumed = start(b, "resume=true")
        assert resumed.wait() == 0, said(resumed)
    finally:
        for proc in procs:  # none left behind when an assertion fails
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    keys = ("loss", "reward_mean", "ratio_mean", "dropped_groups", "sampling_rounds", "clip_fraction")
    assert [r[0] for r in trace(b, *keys)] == [1, 2, 3, 4, 5, 6]
    assert trace(b, *keys) == trace(a, *keys)
    assert len({r[3] for r in trace(a, *keys)}) > 1  # the ratio moves on a rollout's second step
