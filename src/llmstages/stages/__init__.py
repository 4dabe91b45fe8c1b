"""The stages: pretrain, sft, reward, dpo, ppo, grpo, constitutional; each one file, read top to bottom."""
