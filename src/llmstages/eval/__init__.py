"""Evaluation on held-out data: fact recall on the built-in world, and more as the stages land."""
