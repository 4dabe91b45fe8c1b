# Copied verbatim from the seed guide (shared/seed/000_9df41d62738ae02c.txt), Quick Start 3, 'Test Distributed Training Setup'; run by tests/test_seed_guide.py.
# Single-node multi-GPU training
torchrun --nproc_per_node=2 exercise.py

# Multi-node training (on each node)
torchrun --nnodes=2 --node_rank=0 --master_addr="192.168.1.1" --master_port=12355 --nproc_per_node=4 exercise.py
