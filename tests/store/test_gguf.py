"""GGUF export, read back by an independent reader: transformers' GGUF loader (its own dequantisation and its
own undoing of llama.cpp's q/k order) gives our logits and our tokenization; llama.cpp itself in the slow suite."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llmstages.cli import main
from llmstages.store import load_model, load_tokenizer
from tests.helpers import builtin_base, hf_model, save_hf, tiny_tokenizer

TEXT = "Ada lives in Oakfield, keeps 12 cats and a green parrot!"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    out = {"builtin": builtin_base(root / "builtin")}  # ours: tied embeddings, the built-in chat template
    for kind, kw in (("llama", {"tie_word_embeddings": False}), ("qwen2", {}), ("mistral", {"sliding_window": None})):
        # the folder name becomes general.name, from which transformers' reader guesses "mistral" and then fails
        out[kind] = save_hf(hf_model(kind, **kw), root / f"tiny-{kind[:4]}", tiny_tokenizer())
    return out


def read_back(path):
    import transformers as tf

    tf.logging.set_verbosity_error()
    model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    return model, tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("name", ["builtin", "llama", "qwen2", "mistral"])
@pytest.mark.parametrize(("dtype", "tol"), [("f32", 1e-5), ("f16", 2e-2)])
def test_transformers_reads_our_logits_and_tokens(models, tmp_path, capsys, name, dtype, tol):
    out = tmp_path / f"{name}.gguf"
    assert main(["export", "--model", str(models[name]), "--format", "gguf", "--dtype", dtype, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    ours, tok = load_model(models[name]).eval(), load_tokenizer(models[name])
    theirs, their_tok = read_back(out)
    ids = tok.encode(TEXT)
    assert their_tok.encode(TEXT, add_special_tokens=False) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), atol=tol, rtol=tol)


def test_q8_0_is_close(models, tmp_path):
    out = tmp_path / "q.gguf"
    assert (
        main(["export", "--model", str(models["qwen2"]), "--format", "gguf", "--dtype", "q8_0", "--out", str(out)]) == 0
    )
    ours, tok = load_model(models["qwen2"]).eval(), load_tokenizer(models["qwen2"])
    theirs, _ = read_back(out)
    x = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        a, b = ours(x), theirs(x).logits
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())  # 8-bit blocks of 32: about 0.4% each


def test_metadata_travels(models, tmp_path):
    import gguf

    from llmstages.store.gguf import BUILTIN_TEMPLATE

    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(models["builtin"]), "--format", "gguf", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(str(out))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    tok, cfg = load_tokenizer(models["builtin"]), load_model(models["builtin"]).config
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.chat_template") == BUILTIN_TEMPLATE
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_id
    assert field("llama.block_count") == cfg.n_layers and field("llama.attention.head_count_kv") == cfg.n_kv_heads
    assert len(field("tokenizer.ggml.tokens")) == cfg.vocab_size
    assert field("general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd


def test_refusals_write_nothing(models, tmp_path, capsys):
    def refused(argv, says):
        assert main(["export", "--model", str(models["builtin"]), *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err

    refused(["--format", "gguf", "--out", str(tmp_path / "m.bin")], "give a name ending in .gguf")
    (tmp_path / "mine.gguf").write_text("my notes")
    refused(["--format", "gguf", "--out", str(tmp_path / "mine.gguf")], "is not an earlier output")
    refused(["--format", "gguf", "--out", str(tmp_path / "mine.gguf"), "--force"], "is not an earlier output")
    assert (tmp_path / "mine.gguf").read_text() == "my notes"
    refused(["--format", "hf", "--dtype", "q8_0", "--out", str(tmp_path / "hf")], "--dtype is for --format gguf")
    refused(["--format", "gguf", "--out", str(models["builtin"] / "m.gguf")], "is the model being exported")
    gpt2 = save_hf(hf_model("gpt2"), tmp_path / "gpt2", tiny_tokenizer())
    assert main(["export", "--model", str(gpt2), "--format", "gguf", "--out", str(tmp_path / "g.gguf")]) == 2
    assert "llama, mistral and qwen2 families" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "mine.gguf"]
    out = tmp_path / "again.gguf"
    assert main(["export", "--model", str(models["builtin"]), "--format", "gguf", "--out", str(out)]) == 0
    refused(["--format", "gguf", "--out", str(out)], "pass --force to replace it")
    assert main(["export", "--model", str(models["builtin"]), "--format", "gguf", "--out", str(out), "--force"]) == 0


@pytest.mark.slow
def test_llama_cpp_generates_our_greedy_tokens(models, tmp_path):
    """The real client: llama-cpp-python, built from source here (about 6 minutes on 2 cores, without native CPU
    flags: a native build dies with "Illegal instruction" on these virtual machines)."""
    try:
        import llama_cpp
    except ImportError:
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "llama-cpp-python"], check=True, env=env)
        import llama_cpp
    from llmstages.model import generate

    for name in ("builtin", "qwen2"):
        model, tok = load_model(models[name]).eval(), load_tokenizer(models[name])
        for dtype in ("f32", "f16", "q8_0"):
            out = tmp_path / f"{name}-{dtype}.gguf"
            assert main(["export", "--model", str(models[name]), "--format", "gguf", "--dtype", dtype,
                         "--out", str(out)]) == 0  # fmt: skip
            llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, seed=0)
            for prompt in ("Ada lives in", "Bram keeps a", "Two plus two"):
                ids = tok.encode(prompt)
                assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
                ours = generate(model, [ids], 8).tokens[0].tolist()
                llm.reset()
                llm.eval(ids)
                theirs = []
                for _ in range(8):
                    nxt = int(llm.scores[llm.n_tokens - 1].argmax())
                    theirs.append(nxt)
                    llm.eval([nxt])
                if dtype == "q8_0":  # quantised: the logits are close, greedy paths may part late
                    with torch.no_grad():
                        want = model(torch.tensor([ids]))[0, -1]
                    got = torch.tensor(llm.scores[len(ids) - 1])
                    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())
                else:
                    assert theirs == ours, (name, dtype, prompt)
