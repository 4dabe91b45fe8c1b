"""The reward-model stage: Bradley-Terry training learns a preference, the saved directory reloads to the same
scores, and the head reads the last real token of each row."""

from __future__ import annotations

import json

import pytest
import torch

from llmstages.cli import main
from llmstages.data.preference import pair_batch, read_preferences, tokenize_pair
from llmstages.model import GPT, preset
from llmstages.model.heads import RewardModel
from llmstages.monitor.metrics import read_metrics
from llmstages.store import load_tokenizer
from llmstages.store.heads import load_reward_model
from tests.helpers import builtin_base

FAST = [
    "train.max_steps=30", "train.batch_size=8", "train.seq_len=48", "train.log_every=5", "train.eval_every=15",
    "train.save_every=100", "train.warmup_steps=2", "train.precision=fp32", "train.lr=3e-3", "data.val_fraction=0.25",
]  # fmt: skip


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    builtin_base(root / "base")
    towns = ["Oakfield", "Millbrook", "Ashford", "Riverton", "Stonebay", "Fernhill"]
    rows = [{"prompt": f"Where does {n} live?", "chosen": t, "rejected": f"{t} or maybe really {t}"}
            for n in ("Ada", "Bram", "Cleo", "Dev", "Edda", "Finn", "Gus", "Hana") for t in towns]  # fmt: skip
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("method", ["none", "lora"])
def test_learns_the_preference_and_reloads(setup_dirs, tmp_path, method):
    data = f"data.path={setup_dirs / 'prefs.jsonl'}"
    code = main(["reward", f"model.path={setup_dirs / 'base'}", data, f"out_dir={tmp_path}", f"peft.method={method}",
                 "peft.target_modules=[all-linear]", *FAST])  # fmt: skip
    assert code == 0
    records = read_metrics(tmp_path)
    last = [r for r in records if "val_accuracy" in r][-1]
    assert last["val_accuracy"] >= 0.9 and last["val_margin"] > 0
    assert any(k.startswith("calibration/") for k in last)
    rm = load_reward_model(tmp_path / "final").eval()
    tok = load_tokenizer(tmp_path / "final")
    pairs = [tokenize_pair(p, tok, i, 48) for i, p in enumerate(read_preferences([setup_dirs / "prefs.jsonl"]))]
    batch = pair_batch(pairs, tok.pad_id)
    with torch.no_grad():
        r = rm(batch["input_ids"], batch["mask"])
    n = len(pairs)
    assert float((r[:n] > r[n:]).float().mean()) >= 0.9


def test_head_reads_the_last_real_token():
    torch.manual_seed(0)
    rm = RewardModel(GPT(preset("llama_tiny", vocab_size=50, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1)))
    rm.eval()
    x = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = rm(x, mask)
        alone = rm(x[:1, :3], mask[:1, :3])
    assert torch.allclose(padded[0], alone[0], atol=1e-5)  # padding after the sequence changes nothing


def test_not_a_reward_model(setup_dirs):
    from llmstages.errors import UserError

    with pytest.raises(UserError, match="not a reward model"):
        load_reward_model(setup_dirs / "base")


def test_long_pairs_are_cut_or_dropped_counted_and_trained(setup_dirs, tmp_path, capsys):
    """Pairs longer than train.seq_len + 1 are cut (a long prompt from the left, long replies from the right), a pair
    whose replies agree on every token that fits is dropped, and the run trains on the rest, reporting both."""
    rows = [json.loads(line) for line in (setup_dirs / "prefs.jsonl").read_text().splitlines()][:12]
    story = "Ada lives in Oakfield and keeps a grey cat. " * 8
    rows += [{"prompt": story + "Where does Ada live?", "chosen": "Oakfield", "rejected": "Millbrook"}] * 2
    rows += [{"prompt": "Where does Ada live?", "chosen": "Oakfield. " + story, "rejected": "Millbrook. " + story}]
    rows += [{"prompt": "Where does Ada live?", "chosen": story + "Yes.", "rejected": story + "No."}]  # same start
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["reward", f"model.path={setup_dirs / 'base'}", f"data.path={tmp_path / 'long.jsonl'}",
                 f"out_dir={tmp_path / 'run'}", "peft.method=lora", *FAST, "train.max_steps=2",
                 "data.val_fraction=0"])  # fmt: skip
    assert code == 0
    assert (
        "15 pairs (0 held out; 3 truncated, 1 dropped to fit train.seq_len + 1 = 49 tokens)" in capsys.readouterr().out
    )
    start = read_metrics(tmp_path / "run")[0]
    assert (start["pairs"], start["truncated_examples"], start["dropped_examples"]) == (15, 3, 1)
