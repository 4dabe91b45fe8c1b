"""RL plumbing: a reward model scores prompt + reply rows longer than its context by the one policy for long
examples (data/lengths.py): the prompt's end and the reply's start are what it reads."""

from __future__ import annotations

import torch

from llmstages.config import RewardSourceArgs
from llmstages.data.chat import right_pad, tokenize_conversation
from llmstages.losses import IGNORE_INDEX
from llmstages.model import GPT, preset, save_model
from llmstages.model.heads import RewardModel, load_reward_model, save_head
from llmstages.train.rollout import reward_source
from tests.helpers import tiny_tokenizer


def test_a_reward_model_scores_rows_longer_than_its_context(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = preset("llama_tiny", vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                 block_size=32, eos_token_id=tok.eos_id)  # fmt: skip
    rm = RewardModel(GPT(cfg))
    save_model(rm.backbone, tmp_path / "rm", tok)
    save_head(rm.head, tmp_path / "rm", "reward")
    score = reward_source(RewardSourceArgs(fn=None, model=str(tmp_path / "rm")), tok, "cpu")
    prompt, reply = "Ada lives in Oakfield and keeps a grey cat. " * 6, "Bram works as a baker in Millbrook. " * 4
    got = score([prompt, "Where?"], [reply, "Oakfield"], [True, True])
    # by hand: the last 16 tokens of the prompt (half the window: both are long) and the first 16 of the reply
    ex = tokenize_conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], tok)
    start = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    assert start > 16 and len(ex.input_ids) - start > 16  # both longer than their share: the row is cut
    short = tokenize_conversation([{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Oakfield"}],
                                  tok).input_ids  # fmt: skip
    ids, mask = right_pad([ex.input_ids[start - 16 : start + 16], short], tok.pad_id)
    with torch.no_grad():
        want = load_reward_model(tmp_path / "rm")(ids, mask)
    torch.testing.assert_close(torch.tensor(got), want.float(), rtol=0, atol=1e-6)
