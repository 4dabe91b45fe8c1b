"""Typed configs: dataclasses filled from a YAML recipe plus dotted `key=value` overrides.

    cfg = load_config(PretrainConfig, "configs/pretrain/tiny.yaml", ["train.lr=3e-4", "model.n_layers=4"])

Every key is checked against the dataclass fields and their type hints: an unknown key or a value of the
wrong type is a `UserError` naming the key (with the closest valid one), never silently ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llmstages.errors import UserError, closest
from llmstages.model.gpt import ModelConfig

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------------
# Sections shared by the stages


@dataclass
class ModelArgs:
    """Which model to train: a preset (optionally with fields changed) or an existing model directory."""

    preset: str | None = "llama_tiny"
    """A name from `llmstages.model.PRESETS`; ignored when `path` is given."""
    path: str | None = None
    """A model directory (ours or a local Hugging Face one) to start from."""
    fields: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields that change the preset, e.g. `model.n_layers=6` (written without `fields.`)."""


@dataclass
class DataArgs:
    path: list[str] = field(default_factory=list)
    """Files or folders: text files, record files (JSONL/JSON, gzip, Parquet, Arrow or a save_to_disk folder,
    CSV) with a `text` field, or a folder of token shards. Empty: the built-in world's corpus."""
    columns: dict[str, str] = field(default_factory=dict)
    """The file's field for each field a format needs, e.g. {text: content}."""
    tokenizer: str | None = None
    """A directory with tokenizer.json. None: the model's tokenizer, or one trained on the data for a new model."""
    vocab_size: int = 2048
    """Vocabulary size when a tokenizer is trained here."""
    val_fraction: float = 0.05
    """Share of documents held out for validation."""
    workers: int = 2
    """Processes that tokenize in parallel."""
    builtin_size_mb: float = 1.5
    """Size of the built-in corpus."""


@dataclass
class TrainArgs:
    max_steps: int = 1000
    batch_size: int = 16
    """Sequences per micro-batch, per process."""
    seq_len: int = 256
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is the mean over all target tokens of the step."""
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr: float = 3e-5
    """The cosine schedule decays from `lr` to `min_lr` at `max_steps`."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices; none on norms, biases and embeddings."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    optimizer: str = "adamw"
    """adamw (fp32 moments, 8 bytes a trainable parameter), adamw8bit (block-wise 8-bit moments, about 2 bytes) or
    adamw4bit (4-bit moments, about 1 byte; both in train/adamw8bit.py)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    precision: str = "fp32"
    """fp32, bf16 (autocast, CPU or CUDA), fp16 (autocast with a gradient scaler, CUDA only), or auto: bf16 where
    the hardware runs it natively (recent GPUs; CPUs with AMX or AVX512-BF16), else fp32."""
    compile: bool = False
    """torch.compile every transformer block the stage trains, and its frozen reference copy: training and
    evaluation forwards (decoding with the KV cache stays eager). The first steps pay the compilation."""
    activation_checkpointing: bool = False
    """Recompute transformer blocks in the backward pass instead of storing their activations."""
    activation_checkpointing_every: int = 1
    """With activation_checkpointing: recompute every k-th block only (1: all), trading memory for time."""
    eval_every: int = 100
    eval_batches: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a NaN/Inf loss (each one is skipped)."""
    device: str = "auto"
    profile_steps: int = 0
    """> 0: record this many steps (after the first) with torch.profiler: profile/trace_rank*.json (open in
    Perfetto or chrome://tracing) and the top operators printed. `--profile N` on the command line."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 looks the device up in a table (GPUs only)."""


@dataclass
class DistArgs:
    strategy: str = "auto"
    """none, ddp, zero1, fsdp, tp, pp or fsdp+tp; auto is ddp under torchrun with several processes, else none."""
    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU), nccl or gloo."""
    reshard_after_forward: bool = True
    """fsdp: free the gathered parameters after each block's forward (ZeRO-3); false keeps them to the backward
    (ZeRO-2: more memory, less communication)."""
    cpu_offload: bool = False
    """fsdp: keep sharded parameters, gradients and optimizer state in CPU memory (CUDA runs)."""
    tp_size: int = 2
    """fsdp+tp: the tensor-parallel degree; the data-parallel degree is world size / tp_size."""
    microbatches: int = 2
    """pp: pipeline micro-batches each train.batch_size rows are split into."""
    schedule: str = "1f1b"
    """pp: gpipe (all forwards, then all backwards) or 1f1b (interleaved; less activation memory)."""
    timeout_s: float = 300.0
    """A collective that waits longer than this fails the job (a rank that died or hangs)."""


@dataclass
class MonitorArgs:
    tensorboard: bool = True
    """TensorBoard event files under tb/ (when the package is present)."""
    wandb: bool = False
    """Weights & Biases; offline by default (no account needed: `wandb sync <run>/wandb/offline-run-*` later)."""
    wandb_project: str = "llmstages"
    wandb_mode: str = "offline"
    """offline, online or disabled."""
    mlflow: bool = False
    """MLflow (needs the mlflow or mlflow-skinny package), logging to mlflow_uri."""
    mlflow_uri: str = ""
    """A tracking URI; empty: a local file store in the run directory (mlruns/)."""


@dataclass
class PeftArgs:
    method: str = "none"
    """none (full fine-tuning), lora, dora or adapter."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names (suffixes) to adapt, or [all-linear]."""
    use_rslora: bool = False
    """Scale by alpha / sqrt(rank) instead of alpha / rank."""
    bottleneck: int = 64
    """Hidden units of each bottleneck adapter."""
    quantize_base: str = "none"
    """none, or nf4: QLoRA, every frozen linear weight held in 4-bit NormalFloat (lora and dora only)."""

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `llmstages.peft.apply_peft`."""
        targets = "all-linear" if self.target_modules == ["all-linear"] else self.target_modules
        return dict(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=targets,
            use_rslora=self.use_rslora,
            bottleneck=self.bottleneck,
            quantize_base=self.quantize_base,
        )


@dataclass
class SFTDataArgs:
    path: list[str] = field(default_factory=list)
    """SFT files (Alpaca, chat, ShareGPT or prompt/completion records, in any format of data/records.py). Empty:
    the built-in instruction tasks."""
    columns: dict[str, str] = field(default_factory=dict)
    """The file's field for each field a format needs, e.g. {prompt: question, completion: answer}."""
    val_path: list[str] = field(default_factory=list)
    """Held-out SFT files for validation loss and exact match. Empty with built-in tasks: their held-out split."""
    train_on_prompt: bool = False
    """Train on every token, not only the assistant's."""
    packing: bool = False
    """Pack several examples per row (block-diagonal attention, per-example positions)."""
    truncate: bool = True
    """Cut examples longer than train.seq_len (counted and reported); false refuses them."""
    heldout_people: int = 8
    """Built-in tasks: people whose fact questions are held out."""
    styles: bool = True
    """Built-in tasks: fact replies in mixed styles (clean, polite tail, hedged tail) that alignment then learns
    to prefer; false trains on the plain value only."""
    max_eval_examples: int = 256
    max_dropped: float = 0.5
    """Refuse the data when more than this share of its examples must be dropped as too long for train.seq_len
    (each is otherwise cut: the prompt from the left, the reply from the right)."""


@dataclass
class StageArgs:
    """The fields every training stage has; each stage's config extends it."""

    out_dir: str = "runs/run"
    """The run directory: config.yaml, metrics.jsonl, checkpoints/, final/."""
    seed: int = 0
    """The run's randomness: initialisation, data order, dropout and sampling."""
    world_seed: int = 0
    """The built-in world (its table of facts, corpus, questions and splits); unused with your own data."""
    resume: bool = False
    """Continue from the newest checkpoint in `out_dir`."""
    overwrite: bool = False
    """Start this stage's run in `out_dir` again: what the earlier run created there is replaced."""

    def run_args(self, stage: str) -> RunArgs:
        """What the loop's run-folder plumbing takes of this config (every stage's config has train, dist, model)."""
        me: Any = self  # train, dist and model are the subclass's fields
        return RunArgs(stage, self.out_dir, me.train, me.dist, self.resume, self.overwrite, me.model.path)


@dataclass
class RunArgs:
    """What `train.start.start_run` and `prepare_run_dir` use of a stage's config: the stage's name and run folder,
    how it (re)starts, its train and dist settings (the same objects: `start_run` resolves `precision: auto` in
    them), and the model directory it starts from (its digest is recorded)."""

    stage: str
    out_dir: str
    train: TrainArgs
    dist: DistArgs
    resume: bool = False
    overwrite: bool = False
    model_path: str | None = None


@dataclass
class SFTConfig(StageArgs):
    out_dir: str = "runs/sft"
    model: ModelArgs = field(default_factory=lambda: ModelArgs(preset=None))
    data: SFTDataArgs = field(default_factory=SFTDataArgs)
    peft: PeftArgs = field(default_factory=PeftArgs)
    monitor: MonitorArgs = field(default_factory=MonitorArgs)
    dist: DistArgs = field(default_factory=DistArgs)
    train: TrainArgs = field(
        default_factory=lambda: TrainArgs(
            max_steps=100,
            batch_size=16,
            seq_len=128,
            lr=1e-3,
            warmup_steps=10,
            min_lr=1e-4,
            eval_every=25,
            save_every=50,
            weight_decay=0.0,
        )
    )


@dataclass
class PreferenceDataArgs:
    path: list[str] = field(default_factory=list)
    """Preference files: {"prompt","chosen","rejected"}, HH-RLHF dialogues or whole chosen/rejected conversations.
    Empty: built-in pairs, samples of the starting model for each training fact question, labelled by the
    built-in oracle."""
    columns: dict[str, str] = field(default_factory=dict)
    """The file's field for each field a format needs, e.g. {prompt: question, completion: answer}."""
    val_path: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    """Share of pairs held out when no val_path is given."""
    samples: int = 2
    """Built-in pairs: replies sampled per question; every two that the oracle scores differently make a pair."""
    max_dropped: float = 0.5
    """Refuse the data when more than this share of its examples must be dropped as too long for train.seq_len
    (each is otherwise cut: the prompt from the left, the reply from the right)."""


@dataclass
class DPOArgs:
    loss: str = "dpo"
    """dpo (sigmoid), cdpo (dpo with label_smoothing), ipo, hinge (SLiC-HF's, margin 1/beta), simpo (reference-free),
    orpo (reference-free) or kto (unpaired {"prompt","completion","label"} rows; pairs are read as two rows)."""
    beta: float = 0.1
    label_smoothing: float = 0.1
    """cDPO only: the assumed probability that a label is flipped; pairs that carry a `probability` (soft labels,
    e.g. from `llmstages cai label`) use 1 - probability instead."""
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    rpo_alpha: float = 0.0
    """> 0: add rpo_alpha x the chosen reply's mean token NLL to the loss (RPO, Pang et al. 2024; TRL's
    rpo_alpha), which keeps the likelihood of the preferred replies from falling with the rejected ones."""
    kto_desirable_weight: float = 1.0
    """KTO: the weight of the desirable rows' loss (lambda_D; raise it when they are fewer than the undesirable)."""
    kto_undesirable_weight: float = 1.0
    """KTO: the weight of the undesirable rows' loss (lambda_U)."""


@dataclass
class RefArgs:
    precompute: bool = False
    """Compute the reference log-probs of every pair once before training (no reference model kept)."""


@dataclass
class DPOConfig(StageArgs):
    out_dir: str = "runs/dpo"
    model: ModelArgs = field(default_factory=lambda: ModelArgs(preset=None))
    data: PreferenceDataArgs = field(default_factory=PreferenceDataArgs)
    peft: PeftArgs = field(default_factory=PeftArgs)
    dpo: DPOArgs = field(default_factory=DPOArgs)
    ref: RefArgs = field(default_factory=RefArgs)
    monitor: MonitorArgs = field(default_factory=MonitorArgs)
    dist: DistArgs = field(default_factory=DistArgs)
    train: TrainArgs = field(
        default_factory=lambda: TrainArgs(
            max_steps=40,
            batch_size=16,
            seq_len=128,
            lr=1e-5,
            warmup_steps=4,
            min_lr=1e-6,
            eval_every=10,
            save_every=20,
            weight_decay=0.0,
        )
    )


@dataclass
class RewardConfig(StageArgs):
    out_dir: str = "runs/reward"
    model: ModelArgs = field(default_factory=lambda: ModelArgs(preset=None))
    data: PreferenceDataArgs = field(default_factory=PreferenceDataArgs)
    peft: PeftArgs = field(default_factory=PeftArgs)
    margin: float = 0.0
    """Bradley-Terry margin: the chosen reward must beat the rejected one by this much."""
    monitor: MonitorArgs = field(default_factory=MonitorArgs)
    dist: DistArgs = field(default_factory=DistArgs)
    train: TrainArgs = field(
        default_factory=lambda: TrainArgs(
            max_steps=100,
            batch_size=16,
            seq_len=128,
            lr=1e-4,
            warmup_steps=10,
            min_lr=1e-5,
            eval_every=25,
            save_every=50,
            weight_decay=0.0,
        )
    )


@dataclass
class RewardSourceArgs:
    fn: str | None = "llmstages.data.oracle:oracle_reward"
    """A Python callable `module:function(prompts, responses, ended, **columns) -> list[float]`; each column of the
    prompt file other than the prompt (e.g. `answer`) comes as a list aligned with the replies, to a function that
    names it or takes **kwargs."""
    model: str | None = None
    """A reward-model directory (from `llmstages reward`); used instead of `fn` when set."""
    fns: list[str] = field(default_factory=list)
    """Several reward functions (`module:function`, called as `fn` is), e.g. [llmstages.rewards:accuracy,
    llmstages.rewards:format]: the reward is their weighted sum, each logged as reward/NAME. Takes precedence over
    `fn`; not with `model`."""
    weights: list[float] = field(default_factory=list)
    """One weight for each of `fns`; empty: all 1.0."""


@dataclass
class PromptDataArgs:
    path: list[str] = field(default_factory=list)
    """Prompt files ({"prompt"}, GSM8K's {"question", "answer"}, chat or ShareGPT records). Empty: the built-in
    prompts chosen by `builtin`."""
    columns: dict[str, str] = field(default_factory=dict)
    """The file's field for each field a format needs, e.g. {prompt: question, completion: answer}."""
    builtin: str = "facts"
    """The built-in prompts when `path` is empty: facts (questions about the world's training people, evaluated on
    its held-out people) or arithmetic (data/arithmetic.py: +, -, * problems, plain and word problems, with an
    `answer` column for the reward functions; evaluated on a held-out split of 64 problems)."""
    arithmetic_digits: int = 2
    """The most digits of an arithmetic operand (1 to 3)."""
    arithmetic_train: int = 2000
    """How many arithmetic training problems (none of them among the held-out ones)."""
    arithmetic_words: float = 0.5
    """Share of the arithmetic problems phrased as word problems; the others read "What is 59 + 27? ..."."""
    heldout_people: int = 8
    val_fraction: float = 0.1
    """Share of the prompt files' rows held out for evaluation (drawn with the run's seed; training never sees
    them; the evaluation scores up to 64 of them) in PPO and GRPO; CAI revises every row. 0: the evaluation scores
    the first 64 training prompts. The built-in prompts hold out `heldout_people` instead."""
    max_dropped: float = 0.5
    """Refuse the data when more than this share of its examples must be dropped as too long for train.seq_len
    (each is otherwise cut: the prompt from the left, the reply from the right)."""


@dataclass
class GRPOArgs:
    group_size: int = 8
    """Samples per prompt (G); advantages are rewards normalised within each group."""
    prompts_per_step: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    kl_beta: float = 0.05
    """Weight of the k3 KL estimate to the reference in the loss."""
    clip: float = 0.2
    """The ratio's lower clip, 1 - clip (and its upper one, 1 + clip, unless clip_high is set)."""
    clip_high: float | None = None
    """The ratio's upper clip, 1 + clip_high; above `clip` it is DAPO's clip-higher. None: clip (symmetric)."""
    loss_type: str = "dapo"
    """How the per-token terms are normalised (losses.policy_loss): dapo (over every response token of the step:
    the loss this stage has always had), grpo (per reply, then over replies), dr_grpo (by a constant: replies x
    max_new_tokens), bnpo, or gspo (one length-normalised importance ratio per reply)."""
    advantage: str = "group"
    """group (GRPO: within-group mean, and std with scale_advantages), rloo (leave-one-out mean) or reinforce_pp
    (group mean, then the batch's std)."""
    scale_advantages: bool = True
    """Divide by the group's standard deviation (GRPO); false keeps only the mean baseline (Dr. GRPO)."""
    iterations: int = 1
    """Optimizer steps per rollout (TRL's num_iterations): each step after a rollout's first trains on it again,
    so the ratio to the sampling policy moves from 1 and the clip binds. train.max_steps counts optimizer steps."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: groups whose rewards all equal (no signal) are dropped and more prompts drawn until
    prompts_per_step groups have signal, at most max_sampling_rounds rounds (short of it, the step trains on what
    it has); dropped_groups, sampling_rounds and missing_groups are logged."""
    max_sampling_rounds: int = 3
    """Rounds of prompts_per_step prompts dynamic sampling draws at most per rollout."""
    overlong_filter: bool = False
    """DAPO's overlong filtering: replies that reach max_new_tokens without an EOS are masked out of the loss
    (their reward still counts in their group's advantages); the fraction is logged as overlong_filtered."""


@dataclass
class GRPOConfig(StageArgs):
    out_dir: str = "runs/grpo"
    model: ModelArgs = field(default_factory=lambda: ModelArgs(preset=None))
    data: PromptDataArgs = field(default_factory=PromptDataArgs)
    reward: RewardSourceArgs = field(default_factory=RewardSourceArgs)
    peft: PeftArgs = field(default_factory=PeftArgs)
    grpo: GRPOArgs = field(default_factory=GRPOArgs)
    monitor: MonitorArgs = field(default_factory=MonitorArgs)
    dist: DistArgs = field(default_factory=DistArgs)
    train: TrainArgs = field(
        default_factory=lambda: TrainArgs(
            max_steps=30,
            batch_size=64,
            seq_len=64,
            lr=3e-5,
            warmup_steps=2,
            min_lr=3e-6,
            eval_every=10,
            save_every=10,
            weight_decay=0.0,
            log_every=1,
        )
    )


@dataclass
class ReviseArgs:
    rounds: int = 1
    """Critique-and-revise rounds per prompt."""
    choose: str = "all"
    """How each round picks its principle: all (in turn, round k takes principle k) or random."""
    temperature: float = 1.0
    """Sampling temperature of the policy's first response."""
    max_new_tokens: int = 8
    """Length limit of the first response."""
    feedback_tokens: int = 16
    """Length limit of each critique and revision (greedy)."""


@dataclass
class LabelArgs:
    principles: list[str] = field(default_factory=list)
    """Principles whose comparisons are averaged into each label; empty: all of them."""
    samples: int = 2
    """Responses sampled per prompt; every two distinct ones make a pair to label."""
    sample_from: str = "revised"
    """`cai run`: whose responses are labelled: revised (the model fine-tuned on the revisions, as in the paper)
    or start (model.path, whose responses still show what the constitution targets). DPO starts from the
    revised model either way."""
    temperature: float = 1.0
    max_new_tokens: int = 8
    min_probability: float = 0.5
    """Pairs whose label the feedback model gives with less than this probability are left out."""


@dataclass
class CAIRunArgs:
    align: str = "dpo"
    """The RL-from-AI-feedback step: dpo (on the labelled pairs), or ppo (a reward model on them, then PPO)."""
    sft: list[str] = field(default_factory=list)
    """Overrides for the SFT on revisions, over configs/sft/lora.yaml."""
    dpo: list[str] = field(default_factory=list)
    """Overrides for DPO, over configs/dpo/lora.yaml."""
    reward: list[str] = field(default_factory=list)
    """Overrides for the reward model (align=ppo), over configs/reward/lora.yaml."""
    ppo: list[str] = field(default_factory=list)
    """Overrides for PPO (align=ppo), over configs/ppo/lora.yaml."""


@dataclass
class CAIConfig:
    out_dir: str = "runs/cai"
    seed: int = 0
    world_seed: int = 0
    """The built-in world (its questions); unused with your own prompts."""
    device: str = "auto"
    model: ModelArgs = field(default_factory=lambda: ModelArgs(preset=None))
    """The policy (usually the SFT model)."""
    feedback: ModelArgs = field(default_factory=lambda: ModelArgs(preset=None))
    """The feedback model that critiques, revises and compares. Empty path: the policy itself."""
    constitution: str = ""
    """The constitution YAML. Empty: the built-in one (configs/cai/constitution_builtin.yaml)."""
    data: PromptDataArgs = field(default_factory=PromptDataArgs)
    max_prompts: int = 0
    """Use only the first N prompts (0: all)."""
    revise: ReviseArgs = field(default_factory=ReviseArgs)
    label: LabelArgs = field(default_factory=LabelArgs)
    run: CAIRunArgs = field(default_factory=CAIRunArgs)


@dataclass
class PPOArgs:
    rollout_size: int = 64
    """Prompts sampled (one reply each) per rollout."""
    ppo_epochs: int = 2
    minibatches: int = 4
    """Each rollout gives ppo_epochs x minibatches optimizer steps (train.max_steps counts those)."""
    max_new_tokens: int = 8
    temperature: float = 1.0
    clip: float = 0.2
    value_clip: float = 0.5
    value_coef: float = 0.1
    entropy_coef: float = 0.0
    value_lr: float = 1e-3
    """Learning rate of the value head (and a separate critic), scheduled like train.lr."""
    critic: str = "shared"
    """shared: a value head on the policy's trunk; separate: a copy of the initial model with its own head."""
    kl_coef: float = 0.05
    """Per-token KL penalty in the reward: r_t = -kl_coef (log pi_old - log ref) (+ the score at the end)."""
    target_kl: float = 0.0
    """> 0: adapt kl_coef towards this per-token KL (k1 on the rollout, metric kl_k1; Ziegler et al. 2019), horizon
    kl_horizon."""
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a reply that ran out of tokens before its EOS."""


@dataclass
class PPOConfig(StageArgs):
    out_dir: str = "runs/ppo"
    model: ModelArgs = field(default_factory=lambda: ModelArgs(preset=None))
    data: PromptDataArgs = field(default_factory=PromptDataArgs)
    reward: RewardSourceArgs = field(default_factory=RewardSourceArgs)
    peft: PeftArgs = field(default_factory=PeftArgs)
    ppo: PPOArgs = field(default_factory=PPOArgs)
    monitor: MonitorArgs = field(default_factory=MonitorArgs)
    dist: DistArgs = field(default_factory=DistArgs)
    train: TrainArgs = field(
        default_factory=lambda: TrainArgs(
            max_steps=32,
            batch_size=16,
            seq_len=64,
            lr=1e-5,
            warmup_steps=0,
            min_lr=1e-5,
            eval_every=16,
            save_every=16,
            weight_decay=0.0,
            log_every=1,
        )
    )


@dataclass
class PretrainConfig(StageArgs):
    out_dir: str = "runs/pretrain"
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    monitor: MonitorArgs = field(default_factory=MonitorArgs)
    dist: DistArgs = field(default_factory=DistArgs)
    train: TrainArgs = field(default_factory=TrainArgs)


# ----------------------------------------------------------------------------------------------------------------
# Loading


# ----------------------------------------------------------------------------------------------------------------
# Allowed values, checked when a config is loaded (before anything is written): "> 0", ">= 0", "[0, 1)" (an
# interval, brackets inclusive), or a tuple of choices.

Rule = str | tuple[str, ...]
SEED = f"[0, {2**32 - 1}]"  # what every generator takes (numpy's, too), with room to derive seeds from it
RANGES: dict[type, dict[str, Rule]] = {
    TrainArgs: {
        "max_steps": "> 0",
        "batch_size": "> 0",
        "seq_len": "> 0",
        "grad_accum": "> 0",
        "lr": "> 0",
        "warmup_steps": ">= 0",
        "min_lr": ">= 0",
        "weight_decay": ">= 0",
        "beta1": "[0, 1)",
        "beta2": "[0, 1)",
        "eps": "> 0",
        "optimizer": ("adamw", "adamw8bit", "adamw4bit"),
        "grad_clip": ">= 0",
        "eval_every": "> 0",
        "eval_batches": "> 0",
        "save_every": "> 0",
        "keep_checkpoints": ">= 0",
        "log_every": "> 0",
        "max_bad_steps": "> 0",
        "profile_steps": ">= 0",
        "peak_flops": ">= 0",
        "activation_checkpointing_every": ">= 1",
        "precision": ("auto", "fp32", "bf16", "fp16"),
    },
    DistArgs: {
        "strategy": ("auto", "none", "ddp", "zero1", "fsdp", "tp", "pp", "fsdp+tp", "deepspeed"),
        "backend": ("auto", "nccl", "gloo"),
        "tp_size": ">= 1",
        "microbatches": ">= 1",
        "schedule": ("gpipe", "1f1b"),
        "timeout_s": "> 0",
    },
    MonitorArgs: {"wandb_mode": ("offline", "online", "disabled")},
    PeftArgs: {
        "method": ("none", "lora", "dora", "adapter"),
        "rank": "> 0",
        "alpha": "> 0",
        "dropout": "[0, 1)",
        "bottleneck": "> 0",
        "quantize_base": ("none", "nf4"),
    },
    DataArgs: {"vocab_size": ">= 300", "val_fraction": "[0, 1)", "workers": ">= 1", "builtin_size_mb": "> 0"},
    SFTDataArgs: {"heldout_people": "[1, 31]", "max_eval_examples": ">= 0", "max_dropped": "[0, 1]"},
    PreferenceDataArgs: {"val_fraction": "[0, 1)", "samples": ">= 2", "max_dropped": "[0, 1]"},
    PromptDataArgs: {
        "heldout_people": "[1, 31]",
        "val_fraction": "[0, 1)",
        "max_dropped": "[0, 1]",
        "builtin": ("facts", "arithmetic"),
        "arithmetic_digits": "[1, 3]",
        "arithmetic_train": "> 0",
        "arithmetic_words": "[0, 1]",
    },
    DPOArgs: {
        "loss": ("dpo", "cdpo", "ipo", "hinge", "simpo", "orpo", "kto"),
        "beta": "> 0",
        "label_smoothing": "[0, 0.5)",
        "simpo_gamma": ">= 0",
        "orpo_lambda": ">= 0",
        "rpo_alpha": ">= 0",
        "kto_desirable_weight": ">= 0",
        "kto_undesirable_weight": ">= 0",
    },
    GRPOArgs: {
        "group_size": ">= 2",
        "prompts_per_step": "> 0",
        "max_new_tokens": "> 0",
        "temperature": "> 0",
        "kl_beta": ">= 0",
        "clip": "> 0",
        "clip_high": "> 0",
        "loss_type": ("dapo", "grpo", "dr_grpo", "bnpo", "gspo"),
        "advantage": ("group", "rloo", "reinforce_pp"),
        "iterations": ">= 1",
        "max_sampling_rounds": ">= 1",
    },
    PPOArgs: {
        "rollout_size": "> 0",
        "ppo_epochs": "> 0",
        "minibatches": "> 0",
        "max_new_tokens": "> 0",
        "temperature": "> 0",
        "clip": "> 0",
        "value_clip": "> 0",
        "value_coef": ">= 0",
        "entropy_coef": ">= 0",
        "value_lr": "> 0",
        "critic": ("shared", "separate"),
        "kl_coef": ">= 0",
        "target_kl": ">= 0",
        "kl_horizon": "> 0",
        "gamma": "[0, 1]",
        "lam": "[0, 1]",
        "missing_eos_penalty": ">= 0",
    },
    RewardConfig: {"margin": ">= 0"},
    ReviseArgs: {
        "rounds": ">= 1",
        "choose": ("all", "random"),
        "temperature": ">= 0",
        "max_new_tokens": "> 0",
        "feedback_tokens": "> 0",
    },
    LabelArgs: {
        "samples": ">= 2",
        "sample_from": ("revised", "start"),
        "temperature": ">= 0",
        "max_new_tokens": "> 0",
        "min_probability": "[0.5, 1]",
    },
    CAIRunArgs: {"align": ("dpo", "ppo")},
    StageArgs: {"seed": SEED, "world_seed": SEED},
    CAIConfig: {"max_prompts": ">= 0", "seed": SEED, "world_seed": SEED},
}


def _allowed(value: Any, rule: Rule) -> bool:
    if isinstance(rule, tuple):
        return value in rule
    if rule[0] in "[(":
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        above = value >= lo if rule[0] == "[" else value > lo
        below = value <= hi if rule[-1] == "]" else value < hi
        return above and below
    op, bound = rule.split()
    return value > float(bound) if op == ">" else value >= float(bound)


def check_ranges(obj: Any, prefix: str, source: str) -> None:
    """Every field of a config section within its allowed values (RANGES, for its class and the classes it
    extends); a UserError naming the key, the value and what is allowed."""
    rules = {name: rule for cls in reversed(type(obj).__mro__) for name, rule in RANGES.get(cls, {}).items()}
    for name, rule in rules.items():
        value = getattr(obj, name)
        if value is None or _allowed(value, rule):
            continue
        allowed = f"one of {', '.join(rule)}" if isinstance(rule, tuple) else f"in {rule}" if rule[0] in "[(" else rule
        raise UserError(f"{source}: {prefix}{name} must be {allowed}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """`value` as type `tp`; strings from the command line are parsed. UserError when it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))
        if is_none and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except UserError:
                continue
        raise UserError(f"{source}: {key} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is Any:
        return _parse_scalar(value) if isinstance(value, str) else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{source}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{source}: {key} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise UserError(f"{source}: {key} must be a number, got {value!r}")
        if not math.isfinite(number):  # inf or nan trains to NaN weights or fails deep inside a step
            raise UserError(f"{source}: {key} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{source}: {key} must be a string, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):  # YAML flow list: [a, b]
                value = _parse_scalar(text)
                if not isinstance(value, list):
                    raise UserError(f"{source}: {key} must be a list like [a, b], got {text!r}")
            else:  # a,b
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, str):  # from the command line: data.columns={prompt: question}
            value = _parse_scalar(value)
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key} must be a mapping, got {value!r}")
        if typing.get_args(tp) == (str, str) and not all(isinstance(v, str) for kv in value.items() for v in kv):
            raise UserError(f"{source}: {key} must map names to names, like {{prompt: question}}, got {value!r}")
        return value
    return value


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _build(cls: type[T], data: dict[str, Any], prefix: str, source: str) -> T:
    """Instantiate dataclass `cls` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a mapping, got {data!r}")
    data = dict(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs: dict[str, Any] = {}
    if cls is ModelArgs:  # model fields go straight into `fields`, checked against ModelConfig
        model_hints = typing.get_type_hints(ModelConfig)
        extra = dict(data.pop("fields", None) or {})
        for key in [k for k in data if k not in ("preset", "path")]:
            extra[key] = data.pop(key)
        for key, value in extra.items():
            if key not in model_hints:
                valid = [*names[:2], *model_hints]
                raise UserError(f"{source}: unknown key '{prefix}{key}'{closest(key, valid)}")
            extra[key] = _coerce(value, model_hints[key], prefix + key, source)
        kwargs["fields"] = extra
    for key, value in data.items():
        if key not in names:
            full = [prefix + n for n in names]
            raise UserError(f"{source}: unknown key '{prefix}{key}'{closest(prefix + key, full)}")
        tp = hints[key]
        if is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.", source)
        else:
            kwargs[key] = _coerce(value, tp, prefix + key, source)
    obj = cls(**kwargs)
    check_ranges(obj, prefix, source)
    if not prefix:
        check_combinations(obj, source)
    return obj


def check_combinations(cfg: Any, source: str) -> None:
    """Settings of different sections that do not go together; a UserError naming both."""
    peft, dist, train = (getattr(cfg, k, None) for k in ("peft", "dist", "train"))
    if peft is not None and peft.quantize_base != "none" and peft.method not in ("lora", "dora"):
        raise UserError(
            f"{source}: peft.quantize_base={peft.quantize_base} (QLoRA) trains LoRA or DoRA on the quantized "
            f"base; set peft.method=lora or dora (got {peft.method})"
        )
    unsharded_only = (
        [f"peft.quantize_base={peft.quantize_base}"] if peft is not None and peft.quantize_base != "none" else []
    )
    unsharded_only += [f"train.optimizer={train.optimizer}"] if train is not None and train.optimizer != "adamw" else []
    if unsharded_only and dist is not None and dist.strategy not in ("auto", "none", "ddp", "zero1"):
        raise UserError(
            f"{source}: {unsharded_only[0]} runs under dist.strategy none, ddp or zero1, got {dist.strategy}"
        )


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{dotted}': '{part}' is {node!r} in the recipe, not a section of keys")
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice", key_node.start_mark)
            if isinstance(key, str | int | float | bool):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{path}' does not exist")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 text file (byte {e.start}); a recipe is YAML text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """`cls` from a YAML recipe (optional) with `key.sub=value` overrides applied on top."""
    tree = read_yaml(path) if path else {}
    source = str(path) if path else "config"
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key.sub=value")
        key, value = item.split("=", 1)
        _set_dotted(tree, key.strip(), value)
    return _build(cls, tree, "", source if not overrides else f"{source} + overrides")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config, the form written to `config.yaml` in the run directory."""
    d = dataclasses.asdict(cfg)
    model = d.get("model")
    if isinstance(model, dict) and "fields" in model:  # write model fields flat, as they are given
        model.update(model.pop("fields"))
    return d


def save_config(cfg: Any, path: str | Path) -> None:
    write_config(to_dict(cfg), path)


def write_config(record: dict[str, Any], path: str | Path) -> None:
    """A config's plain dict (`to_dict`) as YAML, in field order."""
    Path(path).write_text(yaml.safe_dump(record, sort_keys=False))
