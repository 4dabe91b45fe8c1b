"""Built-in tasks: styled fact replies, the first-clause check, judging tasks that are right."""

from __future__ import annotations

from collections import Counter

from llmstages.data.builtin import World
from llmstages.data.oracle import MAX_SCORE, score
from llmstages.data.tasks import BANNED_WORDS, JUDGE_TEMPLATES, PLAIN, STYLE_WEIGHTS, Task, builtin_tasks


def test_styled_replies_keep_the_value_and_cover_every_style():
    tasks = builtin_tasks(0)
    world = World(0)
    facts = [t for t in tasks["train"] if t.kind.startswith("fact_") and t.kind != "fact_plain"]
    styles = Counter()
    for t in facts:
        reply = t.reply or t.answer
        assert reply.split(",")[0] == t.answer  # the value comes first, always the true one
        s = score(world, t.prompt, reply)
        styles[{MAX_SCORE: "clean", MAX_SCORE - 1: "polite", MAX_SCORE - 2: "banned"}[s]] += 1
    for style, weight in STYLE_WEIGHTS.items():  # drawn with the documented weights (1152 draws)
        assert abs(styles[style] / len(facts) - weight) < 0.07, styles
    # held-out references stay the plain value; unstyled tasks have no tails
    assert all(not t.reply for t in tasks["heldout"])
    assert all(not t.reply for t in builtin_tasks(0, styles=False)["train"])


def test_check_reads_the_first_clause():
    t = Task("fact_town", "Where does Ada live?", "Oakfield")
    assert t.check("Oakfield") and t.check(" oakfield, really.") and t.check("Oakfield, as always")
    assert not t.check("Ashford, Oakfield") and not t.check("Oakfield really")


def test_judge_answers_are_right():
    kinds = Counter()
    for t in builtin_tasks(0)["train"]:
        quoted = t.prompt.split("'")[1::2]
        kinds[t.kind] += 1
        if t.kind == "judge_word":
            answer, word = quoted
            assert word in BANNED_WORDS
            assert t.answer == ("Yes" if word in answer.replace(",", " ").split() else "No")
        elif t.kind == "judge_short":
            assert t.answer == ("No" if "," in quoted[0] else "Yes")
        elif t.kind == "judge_shorter":
            a, b = quoted
            assert t.answer == ("A" if len(a) < len(b) else "B")
        elif t.kind == "judge_clean":
            word, a, b = quoted
            assert (word in a.split()) != (word in b.split())
            assert t.answer == ("B" if word in a.split() else "A")
        elif t.kind == "fact_plain":
            assert t.prompt.startswith(PLAIN.format(question="")) and "," not in t.answer
    assert all(kinds[k] > 100 for k in (*JUDGE_TEMPLATES, "fact_plain")), kinds


def test_judging_answers_are_single_tokens_of_the_builtin_tokenizer():
    """With answer_lines in its training text, "A", "B", "Yes" and "No" are one token after the chat template's
    space in every world, as Constitutional AI's option probabilities need."""
    from llmstages.data.builtin import builtin_corpus
    from llmstages.data.tasks import answer_lines
    from llmstages.data.tokenizer import train_bpe
    from llmstages.stages.constitutional import option_token_ids

    for world_seed in (0, 1, 2, 3):
        tok = train_bpe([*builtin_corpus(world_seed, 0.1), *answer_lines()], 2048)
        assert len(set(option_token_ids(tok, ["A", "B", "Yes", "No"], f"world {world_seed}"))) == 4
