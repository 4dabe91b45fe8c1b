# Copied verbatim from the seed guide (shared/seed/000_9df41d62738ae02c.txt), Quick Start 1, 'Test Basic Model Implementation'; run by tests/test_seed_guide.py.
from exercise import TrainingConfig, SimpleLLM

# Create configuration
config = TrainingConfig(
    vocab_size=10000,
    hidden_size=512,
    num_layers=6,
    num_heads=8,
    max_seq_length=512
)

# Initialize model
model = SimpleLLM(config)

# Test forward pass
import torch
input_ids = torch.randint(0, config.vocab_size, (2, 10))
outputs = model(input_ids)

print(f"Model parameters: {sum(p.numel() for p in model.parameters()):,}")
print(f"Output shape: {outputs['logits'].shape}")
