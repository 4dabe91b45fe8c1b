"""RL prompts: the user's files with their columns, and the held-out split that evaluation scores."""

from __future__ import annotations

import json

import pytest

from llmstages.config import PromptDataArgs
from llmstages.data.prompts import EVAL_PROMPTS, prompt_split
from llmstages.errors import UserError


def _file(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _texts(rows):
    return [m[-1]["content"] for m in rows.prompts]


def test_columns_reach_the_rows_aligned_with_their_prompts(tmp_path):
    rows = [
        {"prompt": "What is 1 + 1?", "answer": "2", "level": 1},
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
         "answer": "4"},
        {"question": "What is 3 + 3?", "answer": "6", "source": "x"},
    ]  # fmt: skip
    data = PromptDataArgs(path=[_file(tmp_path, rows[:2])], val_fraction=0)
    train, held = prompt_split(data, 0, 0)
    assert _texts(train) == ["What is 1 + 1?", "What is 2 + 2?"]
    assert train.columns == {"answer": ["2", "4"], "level": [1, None]}  # a row without a field: None
    assert held.columns == train.columns  # val_fraction 0: evaluation on the training prompts
    mapped = PromptDataArgs(path=[_file(tmp_path, rows[2:], "q.jsonl")], columns={"prompt": "question"}, val_fraction=0)
    train, _ = prompt_split(mapped, 0, 0)
    assert _texts(train) == ["What is 3 + 3?"] and train.columns == {"answer": ["6"], "source": ["x"]}


def test_held_out_split_is_disjoint_deterministic_and_seeded(tmp_path):
    path = _file(tmp_path, [{"prompt": f"q{i}", "answer": str(i)} for i in range(50)])
    data = PromptDataArgs(path=[path], val_fraction=0.2)
    train, held = prompt_split(data, 0, seed=1)
    assert len(held.prompts) == 10 and len(train.prompts) == 40
    assert set(_texts(train)).isdisjoint(_texts(held)) and set(_texts(train)) | set(_texts(held)) == {
        f"q{i}" for i in range(50)
    }
    assert all(held.columns["answer"][k] == t[1:] for k, t in enumerate(_texts(held)))  # columns follow the rows
    assert _texts(train) == sorted(_texts(train), key=lambda t: int(t[1:]))  # training keeps the file's order
    again, held_again = prompt_split(data, 0, seed=1)
    assert _texts(held_again) == _texts(held) and _texts(again) == _texts(train)
    assert _texts(prompt_split(data, 0, seed=2)[1]) != _texts(held)


def test_evaluation_scores_at_most_64_held_out_prompts(tmp_path):
    path = _file(tmp_path, [{"prompt": f"q{i}"} for i in range(1000)])
    train, held = prompt_split(PromptDataArgs(path=[path], val_fraction=0.1), 0, 0)
    assert len(held.prompts) == EVAL_PROMPTS == 64 and len(train.prompts) == 900  # 100 held out, 64 scored


def test_builtin_prompts_keep_their_held_out_people():
    from llmstages.data.prompts import builtin_prompts

    train, held = prompt_split(PromptDataArgs(val_fraction=0.5), world_seed=0, seed=3)
    assert (train.prompts, held.prompts) == builtin_prompts(0, 8)  # data.val_fraction is for prompt files
    assert train.columns == {} and held.columns == {}


def test_bad_prompt_files(tmp_path):
    with pytest.raises(UserError, match="holds out all 1 prompts"):
        prompt_split(PromptDataArgs(path=[_file(tmp_path, [{"prompt": "q"}])]), 0, 0)
    with pytest.raises(UserError, match=r"p.jsonl:2: the column 'ended' has the name of a reward function's own"):
        prompt_split(PromptDataArgs(path=[_file(tmp_path, [{"prompt": "a"}, {"prompt": "b", "ended": 1}])]), 0, 0)


def test_builtin_arithmetic_rows_carry_their_answers_and_hold_out_their_own_problems():
    from llmstages.data.arithmetic import arithmetic_problems

    data = PromptDataArgs(builtin="arithmetic", arithmetic_train=300, arithmetic_digits=3, arithmetic_words=0.3)
    train, held = prompt_split(data, world_seed=2, seed=9)
    problems = arithmetic_problems(2, 300, EVAL_PROMPTS, digits=3, word_share=0.3)
    for rows, want in zip((train, held), problems):
        assert _texts(rows) == [p.question for p in want] and rows.columns == {"answer": [p.answer for p in want]}
    assert len(held.prompts) == EVAL_PROMPTS and set(_texts(train)).isdisjoint(_texts(held))
    assert prompt_split(data, world_seed=2, seed=1) == (train, held)  # fixed by the world seed, not the run's
    assert _texts(prompt_split(data, world_seed=3, seed=9)[1]) != _texts(held)


def test_gsm8k_files_are_read_as_they_come(tmp_path):
    rows = [
        {"question": "Ada has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "What is 10 * 12?", "answer": "#### 120", "id": 2},
    ]
    train, _ = prompt_split(PromptDataArgs(path=[_file(tmp_path, rows)], val_fraction=0), 0, 0)
    assert _texts(train) == [r["question"] for r in rows]
    assert train.columns == {"answer": ["3 + 4 = 7\n#### 7", "#### 120"], "id": [None, 2]}
    # a chat record's own `question` field stays a column: only a record without a prompt is read as GSM8K
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "question": "q"}
    train, _ = prompt_split(PromptDataArgs(path=[_file(tmp_path, [chat], "c.jsonl")], val_fraction=0), 0, 0)
    assert _texts(train) == ["hi"] and train.columns == {"question": ["q"]}
