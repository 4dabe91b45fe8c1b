# Copied verbatim from the seed guide (shared/seed/000_9df41d62738ae02c.txt), Testing, 'Performance Testing'; run by tests/test_seed_guide.py.
# Test distributed training
torchrun --nproc_per_node=2 exercise.py

# Profile memory usage
python -m memory_profiler exercise.py

# Benchmark training speed
python -c "
from exercise import *
import time

config = TrainingConfig(batch_size=8)
model = SimpleLLM(config)
data = torch.randint(0, config.vocab_size, (8, 512))

start_time = time.time()
for _ in range(100):
    outputs = model(data)
    loss = outputs['loss'] if 'loss' in outputs else torch.tensor(0.0)
    loss.backward()

print(f'Training speed: {100 / (time.time() - start_time):.2f} steps/sec')
"
