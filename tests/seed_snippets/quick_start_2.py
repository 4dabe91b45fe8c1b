# Copied verbatim from the seed guide (shared/seed/000_9df41d62738ae02c.txt), Quick Start 2, 'Test Parameter-Efficient Fine-tuning'; run by tests/test_seed_guide.py.
from exercise import LoRALayer, AdapterLayer

# Test LoRA
linear_layer = torch.nn.Linear(512, 512)
lora_layer = LoRALayer(linear_layer, rank=16, alpha=32)

# Count trainable parameters
total_params = sum(p.numel() for p in lora_layer.parameters())
trainable_params = sum(p.numel() for p in lora_layer.parameters() if p.requires_grad)

print(f"Total parameters: {total_params:,}")
print(f"Trainable parameters: {trainable_params:,}")
print(f"Trainable ratio: {trainable_params/total_params:.2%}")

# Test Adapter
adapter = AdapterLayer(hidden_size=512, adapter_size=64)
test_input = torch.randn(2, 10, 512)
output = adapter(test_input)
print(f"Adapter output shape: {output.shape}")
