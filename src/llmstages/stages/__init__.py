"""The stages: pretrain, sft, reward, dpo, ppo, grpo, constitutional; each one file, read top to bottom.

`STAGES` is the one registry of them (name -> config class, entry point, one-line help) that the command line,
the demo and the reward-KL frontier share; a stage module is imported only when its stage runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstages import config as C

RECIPES = Path(__file__).resolve().parent.parent / "configs"  # the shipped recipes (configs/ at the repository root)


@dataclass(frozen=True)
class Stage:
    name: str
    config: type
    module: str
    entry: str
    help: str

    @property
    def main(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(f"llmstages.stages.{self.module}"), self.entry)

    def load(self, recipe: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
        """This stage's config from a recipe (a path, or a name under configs/ such as "sft/lora.yaml")."""
        if recipe is not None and not Path(recipe).is_file() and (RECIPES / recipe).is_file():
            recipe = RECIPES / recipe
        return C.load_config(self.config, recipe, overrides)

    def chained(
        self,
        recipe: str | Path,
        overrides: list[str] | tuple[str, ...],
        out_dir: Path,
        seed: int,
        world_seed: int,
        model_path: str | Path | None = None,
    ) -> Any:
        """This stage's config as one step of a pipeline (the demo, `cai run`): the recipe with `overrides`, run in
        `out_dir` (a training stage resumes there where it stopped), with the pipeline's seeds, starting from
        `model_path` (None: the recipe's)."""
        cfg = self.load(recipe, overrides)
        cfg.out_dir, cfg.seed, cfg.world_seed = str(out_dir), seed, world_seed
        if model_path is not None:
            cfg.model.path = str(model_path)
        if self.name in TRAINING:
            cfg.resume = True
        return cfg

    def run(self, recipe: str | Path | None, overrides: list[str] | tuple[str, ...] = (), progress: bool = True):
        return self.main(self.load(recipe, overrides), progress)


STAGES = {
    s.name: s
    for s in (
        Stage("pretrain", C.PretrainConfig, "pretrain", "main", "stage 1: pre-train a model on text"),
        Stage("sft", C.SFTConfig, "sft", "main", "stage 2: supervised fine-tuning (full, LoRA, DoRA or adapters)"),
        Stage(
            "reward", C.RewardConfig, "reward", "main", "stage 3: a reward model on preference pairs (Bradley-Terry)"
        ),
        Stage("dpo", C.DPOConfig, "dpo", "main", "stage 3: DPO family (dpo, cdpo, ipo, hinge, simpo, orpo, kto)"),
        Stage("ppo", C.PPOConfig, "ppo", "main", "stage 3: PPO with a critic, a KL penalty to the reference and GAE"),
        Stage("grpo", C.GRPOConfig, "grpo", "main", "stage 3: GRPO, group-relative policy optimisation"),
        Stage("cai", C.CAIConfig, "constitutional", "main_run", "stage 3: Constitutional AI: revise, SFT, label, DPO"),
    )
}
TRAINING = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")  # `llmstages <stage>`; cai has its own actions
