"""Runs several `llmstages` commands in one `torchrun` launch (start-up costs seconds; tests share it).

    python -m torch.distributed.run --nproc_per_node=2 tests/train/dist_worker.py jobs.json

jobs.json: a list of {"argv": [...]} (what follows `llmstages`). Each rank writes its exit codes to
jobs.json.rank<R>: one per job, in order. The process group is kept from one job to the next and left at the
end (as the CLI does after each command).
"""

import json
import os
import sys
from pathlib import Path

from llmstages.cli import main
from llmstages.train import distributed

leave = distributed.shutdown
distributed.shutdown = distributed.current().barrier  # keep the process group between jobs (no re-init)
jobs = json.loads(Path(sys.argv[1]).read_text())
codes = []
for job in jobs:
    codes.append(main(job["argv"]))
Path(f"{sys.argv[1]}.rank{os.environ['RANK']}").write_text(json.dumps(codes))
leave()
sys.exit(max(codes) if codes else 0)
