"""What `memory.measure` runs in a fresh interpreter: three training steps of the model a JSON spec describes,
printing the peak resident memory they added (bytes) as JSON.

    python -m llmstages.train.memory_probe '{"config": {...}, "method": "lora", "precision": "fp32", ...}'
"""

from __future__ import annotations

import json
import resource
import sys

import torch

from llmstages.config import TrainArgs
from llmstages.losses import lm_loss
from llmstages.model.gpt import GPT, ModelConfig
from llmstages.peft import apply_lora
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


def main(spec: dict) -> int:
    """Peak resident bytes of three steps above what the interpreter held before the model was built."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randint(0, 100, (spec["batch"], spec["seq"]))
    base = high_water()
    model = GPT(ModelConfig.from_dict(spec["config"]))
    if spec["method"] == "lora":
        apply_lora(model, rank=spec["lora_rank"], alpha=16, target_modules=spec["lora_targets"])
    if spec["checkpointing"]:
        apply_activation_checkpointing(model)
    opt = build_optimizer(model, TrainArgs())
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
