"""What `memory.measure` runs in a fresh interpreter: three training steps of the model a JSON spec describes,
printing the peak resident memory they added (bytes) as JSON.

    python -m llmstages.train.memory_probe '{"config": {...}, "method": "lora", "precision": "fp32", ...}'
"""

from __future__ import annotations

import gc
import json
import resource
import sys

import torch

from llmstages.config import TrainArgs
from llmstages.losses import lm_loss
from llmstages.model.gpt import GPT, ModelConfig
from llmstages.peft import apply_lora, quantize_frozen
from llmstages.train.frozen import hold_frozen
from llmstages.train.optim import build_optimizer
from llmstages.train.prepare import apply_activation_checkpointing
from llmstages.train.start import autocast


def high_water() -> int:
    """This process's peak resident memory; ru_maxrss would include the parent's (kept over exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_high_water() -> None:
    """Start the peak over from the memory held now (Linux: clear_refs 5), so that building the model in fp32
    before QLoRA quantizes it does not count: what is measured is training."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def main(spec: dict) -> int:
    """Peak resident bytes of three steps above what the interpreter held before the model was built: the model
    as it trains (QLoRA: in NF4; LoRA under bf16/fp16: frozen weights in that dtype) plus what the steps add."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randint(0, 100, (spec["batch"], spec["seq"]))
    base = high_water()
    model = GPT(ModelConfig.from_dict(spec["config"]))
    if spec["method"] in ("lora", "qlora"):
        targets = spec["lora_targets"]
        apply_lora(
            model, rank=spec["lora_rank"], alpha=16, target_modules=targets[0] if targets == ["all-linear"] else targets
        )
        if spec["method"] == "qlora":
            quantize_frozen(model)
        hold_frozen(model, spec["precision"])  # as train/prepare.py does (QLoRA: the embedding and head too)
    if spec["checkpointing"]:
        apply_activation_checkpointing(model)
    opt = build_optimizer(model, TrainArgs(optimizer=spec.get("optimizer", "adamw")))
    reset_high_water()
    batch = {"input_ids": x, "targets": x}
    for _ in range(3):
        with autocast(torch.device("cpu"), spec["precision"]):
            loss, _ = lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return high_water() - base


if __name__ == "__main__":
    print(json.dumps({"peak": main(json.loads(sys.argv[1]))}))
