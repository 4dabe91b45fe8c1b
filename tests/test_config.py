"""Typed configs: recipes and overrides fill dataclasses; unknown keys and wrong types are clear errors."""

from __future__ import annotations

import pytest

from llmstages.config import PretrainConfig, load_config, save_config
from llmstages.errors import UserError


def test_overrides_and_types(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 1.0e-3\n  max_steps: 5\nmodel:\n  preset: gpt2_tiny\n  n_layers: 3\n")
    cfg = load_config(PretrainConfig, recipe, ["train.lr=3e-4", "train.precision=bf16", "model.d_model=64",
                                                "resume=true", "data.path=a.txt,b.txt"])  # fmt: skip
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 5 and cfg.resume is True
    assert cfg.model.preset == "gpt2_tiny" and cfg.model.fields == {"n_layers": 3, "d_model": 64}
    assert cfg.data.path == ["a.txt", "b.txt"]
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(PretrainConfig, tmp_path / "resolved.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.lr=1", "unknown key 'trian'"),
        ("model.n_layer=2", "unknown key 'model.n_layer' (did you mean 'n_layers'?)"),
        ("train.lr=fast", "train.lr must be a number, got 'fast'"),
        ("train.max_steps=1.5", "train.max_steps must be an integer"),
        ("resume=maybe", "resume must be true or false"),
        ("model.n_layers=two", "model.n_layers must be an integer"),
        ("lr", "must look like key.sub=value"),
    ],
)
def test_bad_keys_and_values(override, message):
    with pytest.raises(UserError) as e:
        load_config(PretrainConfig, None, [override])
    assert message in str(e.value)


def test_typo_in_a_recipe_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  warmup_step: 10\n")
    with pytest.raises(UserError, match=r"r.yaml: unknown key 'train.warmup_step' \(did you mean 'train.warmup_steps'"):
        load_config(PretrainConfig, recipe)


def test_invalid_yaml_names_the_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(UserError, match=r"r.yaml: line \d+ invalid YAML"):
        load_config(PretrainConfig, recipe)


def test_recipes_in_the_repository_load():
    from pathlib import Path

    from llmstages.config import CAIConfig, DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig
    from llmstages.data.constitution import load_constitution

    root = Path(__file__).resolve().parents[1] / "configs"
    classes = {"pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig,
               "grpo": GRPOConfig, "ppo": PPOConfig, "cai": CAIConfig}  # fmt: skip
    recipes = sorted(root.glob("*/*.yaml"))
    assert len(recipes) >= 10
    for recipe in recipes:
        if recipe.name.startswith("constitution_"):
            load_constitution(recipe)
        else:
            load_config(classes[recipe.parent.name], recipe)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=inf", "train.lr must be a finite number, got 'inf'"),
        ("train.weight_decay=nan", "train.weight_decay must be a finite number"),
        ("train.eps=-inf", "train.eps must be a finite number"),
        ("seed=18446744073709551616", "seed must be in [0, 4294967295]"),
        ("world_seed=-1", "world_seed must be in [0, 4294967295]"),
    ],
)
def test_every_float_is_finite_and_seeds_fit(override, message):
    """inf and nan trained to NaN weights with exit 0; a seed past 64 bits failed inside torch."""
    with pytest.raises(UserError) as e:
        load_config(PretrainConfig, None, [override])
    assert message in str(e.value)


def test_a_non_finite_value_in_a_recipe_is_refused(tmp_path):
    from llmstages.config import CAIConfig, DPOConfig, PPOConfig, SFTConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("dpo:\n  beta: .inf\n")
    with pytest.raises(UserError, match="dpo.beta must be a finite number, got inf"):
        load_config(DPOConfig, recipe)
    with pytest.raises(UserError, match=r"ppo.kl_coef must be a finite number, got 'nan'"):
        load_config(PPOConfig, None, ["ppo.kl_coef=nan"])
    with pytest.raises(UserError, match=r"data.max_dropped must be in \[0, 1\]"):
        load_config(SFTConfig, None, ["data.max_dropped=1.5"])
    with pytest.raises(UserError, match="seed must be in"):
        load_config(CAIConfig, None, ["seed=-3"])
