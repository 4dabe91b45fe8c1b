"""Tokenizers: trained here, saved, loaded by us and by transformers alike; the CLI writes shards too."""

from __future__ import annotations

import json

import pytest

from llmstages.cli import main
from llmstages.data.text import TokenShards
from llmstages.data.tokenizer import EOS, ROLE_TOKENS, Tokenizer
from llmstages.errors import UserError
from tests.helpers import TEXT, tiny_tokenizer


def test_roundtrip_and_specials(tmp_path):
    tok = tiny_tokenizer()
    text = "Ada lives in Oakfield and keeps a grey cat."
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id is not None and tok.encode(text, add_eos=True)[-1] == tok.eos_id
    assert all(tok.token_to_id(t) is not None for t in ROLE_TOKENS)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(text) == tok.encode(text) and again.eos_token == EOS
    assert again.chat_template == tok.chat_template
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text) and hf.eos_token == EOS


def test_cli_trains_and_tokenizes(tmp_path, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    out = tmp_path / "tok"
    assert main(["tokenizer", "--data", str(data), "--vocab-size", "320", "--out", str(out), "--tokenize",
                 "--workers", "1"]) == 0  # fmt: skip
    tok = Tokenizer.load(out)
    assert 300 <= tok.vocab_size <= 320
    shards = TokenShards.open(out)
    assert shards.meta["documents"] == len(TEXT) and shards.meta["vocab_size"] == tok.vocab_size
    assert main(["tokenizer", "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


# A template in the style of the ones models ship: loop controls, tojson of non-ASCII text, the generation tag,
# its own rules through raise_exception.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('the system message must come first') }}{% endif %}"
    "{% if m['content'] == 'STOP' %}{% break %}{% endif %}"
    "<{{ m['role'] }}>{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] | tojson }}{% endif %}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Sé breve."},
    {"role": "user", "content": 'Où habite Ada? "quotes" <b>'},
    {"role": "assistant", "content": "À Oakfield."},
    {"role": "user", "content": "STOP"},
    {"role": "assistant", "content": "never rendered"},
]


def test_chat_template_renders_as_transformers_does(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save(tmp_path)
    ours = Tokenizer.load(tmp_path)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for gen in (False, True):
        want = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(MESSAGES, gen) == want
    assert '"Où habite Ada? \\"quotes\\" <b>"' in want  # tojson keeps non-ASCII and HTML characters
    with pytest.raises(UserError, match=r"tokenizer_config.json: chat template: the system message must come first$"):
        ours.apply_chat_template([MESSAGES[1], MESSAGES[0]])


@pytest.mark.parametrize(
    ("template", "says"),
    [
        (
            "{% for m in messages %}{{ m['content'] }",
            r"the chat template does not compile \(template line 1: unexpected '}'\)",
        ),
        (
            "{% if x %}\n{{ messages | shout }}{% endif %}",
            r"the chat template does not compile \(template line 2: No filter named 'shout'",
        ),
        ("{{ messages[0]['content'] + 1 }}", r"the chat template failed \(TypeError: "),
        ("{{ messages.__class__.__mro__ }}", r"the chat template failed \(SecurityError: "),  # the sandbox
        (5, r"'chat_template' must be a string, got int"),
        ([{"name": "tool_use"}], r"'chat_template' as a list must hold \{name, template\} objects"),
    ],
    ids=["syntax", "unknown-filter", "type-error", "sandbox", "not-a-string", "bad-list"],
)
def test_a_broken_chat_template_is_refused_when_loaded(tmp_path, template, says):
    tiny_tokenizer().save(tmp_path)
    conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": template}))
    with pytest.raises(UserError, match=rf"tokenizer_config.json: {says}") as e:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(e.value)


def test_a_template_file_is_named_and_its_own_rules_pass(tmp_path):
    tiny_tokenizer().save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }\n")
    with pytest.raises(UserError, match=r"chat_template.jinja: the chat template does not compile"):
        Tokenizer.load(tmp_path)
    # a template that refuses the check's plain conversation with its own raise_exception works: it is loaded
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('only tool calls, please') }}")
    tok = Tokenizer.load(tmp_path)
    with pytest.raises(UserError, match=r"chat_template.jinja: chat template: only tool calls, please$"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
