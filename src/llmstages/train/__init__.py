"""Training machinery shared by the stages: the loop, checkpoints, distributed helpers."""
