"""Runs several `llmstages` commands in one `torchrun` launch (start-up costs seconds; tests share it).

    python -m torch.distributed.run --nproc_per_node=2 tests/train/dist_worker.py jobs.json

jobs.json: a list of jobs, each one of
    {"argv": [...]}                       what follows `llmstages` on the command line
    {"argv": [...], "fail_rank": R, "fail_step": S}   the same, with rank R raising at optimizer step S + 1
    {"remove": [path, ...]}               rank 0 deletes these (e.g. a checkpoint, to resume from an older one)
Each rank writes its exit codes to jobs.json.rank<R>, one per command, in order. The process group is kept from
one job to the next and left at the end (the CLI leaves it after each command).
"""

import json
import os
import shutil
import sys
from pathlib import Path

from llmstages.cli import main
from llmstages.train import distributed
from llmstages.train import loop as loop_mod

leave = distributed.shutdown
distributed.shutdown = lambda: distributed.current().barrier()  # no re-init between jobs
rank = int(os.environ["RANK"])
real_step = loop_mod.Trainer.forward_backward


def failing_step(step: int):
    def _step(self, batches, loss_fn, count_fn):
        if self.state.step == step:
            raise RuntimeError(f"injected failure at step {step + 1}")
        return real_step(self, batches, loss_fn, count_fn)

    return _step


codes = []
for job in json.loads(Path(sys.argv[1]).read_text()):
    if "remove" in job:
        if rank == 0:
            for p in job["remove"]:
                shutil.rmtree(p, ignore_errors=True)
        distributed.current().barrier()
        continue
    fails = job.get("fail_rank") == rank
    loop_mod.Trainer.forward_backward = failing_step(job["fail_step"]) if fails else real_step
    codes.append(main(job["argv"]))
Path(f"{sys.argv[1]}.rank{rank}").write_text(json.dumps(codes))
leave()
sys.exit(max(codes) if codes else 0)
