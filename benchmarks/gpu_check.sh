#!/usr/bin/env bash
# One prepared GPU session (the device tool runs it from the repository root; results go to $OUT):
# the CUDA tests, the benchmarks on the GPU, and gpt2_124m pre-training throughput with MFU (bf16, compiled).
set -u
export PYTHONPATH=src OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/model/test_generate.py 2>&1 | tail -4
timeout 120 python3 benchmarks/train_step.py --device cuda --rounds 10 2>&1 | grep -E "^[#|]"
timeout 120 python3 benchmarks/generate.py --device cuda --rounds 5 2>&1 | grep -E "^[#|]"
timeout 300 python3 benchmarks/finetune_vs_hf.py --device cuda --rounds 5 --compile 2>&1 | grep -E "^[#|]"
timeout 120 python3 benchmarks/pretrain_throughput.py --device cuda --rounds 3 --steps 5 2>&1 | grep -E "^[#|]"
timeout 300 python3 -m llmstages pretrain --config configs/pretrain/gpt2_124m.yaml out_dir=/tmp/gpt2 \
  train.max_steps=60 train.grad_accum=1 train.log_every=10 train.eval_every=1000 train.save_every=1000 \
  data.workers=8 > "$OUT/gpt2_pretrain.log" 2>&1
tail -c 1500 "$OUT/gpt2_pretrain.log"
grep -E '"mfu"' /tmp/gpt2/metrics.jsonl | tail -4
cp /tmp/gpt2/metrics.jsonl "$OUT/gpt2_metrics.jsonl" 2>/dev/null
} 2>&1 | tee "$OUT/gpu_check.log"
