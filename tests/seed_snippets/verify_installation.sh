# Copied verbatim from the seed guide (shared/seed/000_9df41d62738ae02c.txt), Installation 3, 'Verify Installation'; run by tests/test_seed_guide.py.
# Run verification script
python -c "
import torch
import transformers
import accelerate
print(f'PyTorch version: {torch.__version__}')
print(f'CUDA available: {torch.cuda.is_available()}')
if torch.cuda.is_available():
    print(f'CUDA device: {torch.cuda.get_device_name(0)}')
    print(f'CUDA memory: {torch.cuda.get_device_properties(0).total_memory / 1e9:.1f} GB')
print(f'Transformers version: {transformers.__version__}')
print('‚úÖ All dependencies installed successfully!')
"
