"""RL plumbing: a reward model scores prompt + reply rows longer than its context by the one policy for long
examples (data/lengths.py): the prompt's end and the reply's start are what it reads."""

from __future__ import annotations

import torch

from llmstages.config import RewardSourceArgs
from llmstages.data.chat import right_pad, tokenize_conversation
from llmstages.losses import IGNORE_INDEX
from llmstages.model import GPT, preset
from llmstages.model.heads import RewardModel
from llmstages.rl.rollout import reward_source
from llmstages.store import save_model
from llmstages.store.heads import load_reward_model, save_head
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


USER_FNS = """
def plain(prompts, responses, ended):
    return [1.0] * len(responses)


def by_answer(prompts, responses, ended, answer, bonus=0.0):
    return [float(r == a) + bonus for r, a in zip(responses, answer)]


def everything(prompts, responses, ended, **columns):
    return [float(len(columns))] * len(responses)


def judge(prompts, responses, ended, world_seed=0):
    return [float(world_seed)] * len(responses)
"""


def _user_fns(tmp_path, monkeypatch, name):
    (tmp_path / f"{name}.py").write_text(USER_FNS)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_each_reward_function_gets_the_columns_it_takes(tmp_path, monkeypatch):
    """A function naming no column is called as before; one naming `answer` gets that column only (and its
    default for a parameter no column fills); one with **kwargs gets all; `world_seed` is still bound (the
    oracle's keyword); the total is the weighted sum, each function's scores kept by its name."""
    _user_fns(tmp_path, monkeypatch, "rollout_fns")
    names = ["plain", "by_answer", "everything", "judge"]
    args = RewardSourceArgs(fns=[f"rollout_fns:{n}" for n in names], weights=[1.0, 2.0, 0.5, -1.0])
    sample = ("What is 2?", {"answer": "2", "source": "s"})
    reward = reward_source(args, tiny_tokenizer(), "cpu", world_seed=3, sample=sample)
    total, each = reward.scored(["q", "q"], ["2", "x"], [True, False], answer=["2", "2"], source=["a", "b"])
    assert each == {"plain": [1.0, 1.0], "by_answer": [1.0, 0.0], "everything": [2.0, 2.0], "judge": [3.0, 3.0]}
    assert total == [1.0 + 2.0 + 1.0 - 3.0, 1.0 + 0.0 + 1.0 - 3.0]
    assert reward.stats(each) == {"reward/plain": 1.0, "reward/by_answer": 0.5, "reward/everything": 2.0,
                                  "reward/judge": 3.0}  # fmt: skip


def test_one_reward_fn_and_the_oracle_keep_working(tmp_path, monkeypatch):
    from llmstages.data.oracle import oracle_reward

    _user_fns(tmp_path, monkeypatch, "rollout_fns_one")
    tok = tiny_tokenizer()
    one = reward_source(RewardSourceArgs(fn="rollout_fns_one:plain"), tok, "cpu", sample=("q", {"answer": "2"}))
    assert one(["q"], ["r"], [True], answer=["2"]) == [1.0] and one.stats({"plain": [1.0]}) == {}  # not named
    oracle = reward_source(RewardSourceArgs(), tok, "cpu", world_seed=2)
    prompts, replies = ["Where does Ada live?"] * 2, ["Oakfield", ""]
    assert oracle(prompts, replies, [True, False]) == oracle_reward(prompts, replies, [True, False], world_seed=2)
