"""RL plumbing between the training loop and the alignment stages: the policy and its reference, rollouts,
reward sources (rollout.py), and preference pairs sampled from a policy (pairs.py)."""
