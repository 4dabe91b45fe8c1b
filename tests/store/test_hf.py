"""Our model against Hugging Face transformers: same weights, same logits; export back, same logits again."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmstages.errors import UserError
from llmstages.store import export_hf, load_config, load_model, load_tokenizer, save_model
from tests.helpers import hf_model, save_hf, tiny_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CASES = {
    "gpt2": {},
    "llama": {},  # num_key_value_heads=2 < 4 heads: grouped-query attention
    "llama-tied-bias": dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "llama3-rope": dict(rope_theta=500000.0, max_position_embeddings=64,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=16)),
    "qwen2": {},
    "mistral-window": dict(sliding_window=8),
}  # fmt: skip


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("case", list(CASES))
def test_import_export_matches_transformers(case, tmp_path):
    kind = case.split("-")[0].replace("llama3", "llama")
    ref = hf_model(kind, **CASES[case])
    src = save_hf(ref, tmp_path / "hf", tiny_tokenizer())
    ours = load_model(src)
    assert ours.config.family == kind
    x = torch.randint(0, 300, (3, 24))
    expected = _logits(ref, x)
    assert (_logits(ours, x) - expected).abs().max() < 1e-4

    out = export_hf(ours, tmp_path / "exported", load_tokenizer(src))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert (_logits(back, x) - expected).abs().max() < 1e-4
    # The exported tokenizer loads in transformers and agrees with ours.
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Ada lives in Oakfield."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == load_tokenizer(out).encode(text)


def test_left_padded_batch_matches_transformers(tmp_path):
    ref = hf_model("llama")
    ours = load_model(save_hf(ref, tmp_path / "hf"))
    x = torch.randint(0, 300, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # row 0 is left-padded
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ref(x, attention_mask=mask, position_ids=pos).logits
        b = ours(x, mask=mask)
    assert (a - b)[mask.bool()].abs().max() < 1e-4


def test_our_directory_roundtrip(tmp_path):
    ref = hf_model("qwen2")
    ours = load_model(save_hf(ref, tmp_path / "hf"))
    save_model(ours, tmp_path / "ours", tiny_tokenizer())
    again = load_model(tmp_path / "ours")
    assert json.loads((tmp_path / "ours/config.json").read_text())["llmstages_format"] == 1
    x = torch.randint(0, 300, (2, 10))
    assert torch.equal(_logits(ours, x), _logits(again, x))
    assert load_config(tmp_path / "ours") == ours.config


def test_sharded_checkpoint(tmp_path):
    ref = hf_model("llama")
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "hf/model.safetensors.index.json").is_file()
    x = torch.randint(0, 300, (1, 8))
    assert (_logits(load_model(tmp_path / "hf"), x) - _logits(ref, x)).abs().max() < 1e-4


# -- bad input ---------------------------------------------------------------------------------------------------


def test_missing_directory_and_hub_id():
    with pytest.raises(UserError, match="does not exist"):
        load_model("no/such/dir/here")
    with pytest.raises(UserError, match="hub id"):
        load_model("meta-llama/Llama-3.2-1B")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(UserError, match="model_type 'bert' is not supported"):
        load_model(tmp_path)


def test_refused_options(tmp_path):
    cfg = hf_model("qwen2").config.to_dict()
    cfg.update(use_sliding_window=True, sliding_window=8)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="use_sliding_window"):
        load_config(tmp_path)
    cfg = hf_model("llama").config.to_dict()
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="yarn"):
        load_config(tmp_path)


def test_missing_and_misshaped_tensors(tmp_path):
    src = save_hf(hf_model("llama"), tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, src / "model.safetensors")
    with pytest.raises(UserError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        load_model(src)
    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(5, 32)
    save_file(bad, src / "model.safetensors")
    with pytest.raises(UserError, match=r"k_proj.weight' has shape \(5, 32\), expected \(16, 32\)"):
        load_model(src)


def _file(header: dict) -> bytes:
    """A safetensors file of this header and no data."""
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob


def every_dtype() -> dict[str, torch.Tensor]:
    """A tensor of each dtype safetensors stores, of several shapes (a scalar and an empty one among them)."""
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(4, 2, generator=g).bfloat16(),
        "f16": torch.randn(7, generator=g).half(), "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.arange(6).view(2, 3), "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
        "f8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
    }  # fmt: skip


def test_safetensors_reader_equals_the_library_and_owns_its_memory(tmp_path, monkeypatch):
    """store/hf.py reads safetensors itself (tensors in memory of their own, not a mapping of the file): every
    dtype and shape as safetensors' own `load_file` reads them, floating ones converted on request; a damaged
    file is one clear error naming it."""
    from llmstages.store import hf as hf_store
    from llmstages.store.hf import read_safetensors_file

    tensors = every_dtype()
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    want = load_file(path)
    got = read_safetensors_file(path)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
        assert got[k].untyped_storage().nbytes() == v.numel() * v.element_size()  # its own, not the file's
    half = read_safetensors_file(path, torch.bfloat16)
    assert half["f32"].dtype == torch.bfloat16 and torch.equal(half["f32"], want["f32"].bfloat16())
    assert half["i64"].dtype == torch.int64
    monkeypatch.setattr(hf_store, "CONVERT_BYTES", 6)  # converted in pieces of 1 to 6 values
    for dtype in (torch.float32, torch.bfloat16):
        got = read_safetensors_file(path, dtype)
        for k, v in want.items():
            assert torch.equal(got[k], v.to(dtype) if v.is_floating_point() else v), (k, dtype)
    data = path.read_bytes()
    for damaged, why in (
        (data[:-4], "past the end"),
        (data[:5], "header"),
        (b"\x10" + b"\0" * 7 + b"{not json}!!!!!!", "JSON"),
        (_file({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}}), "negative dimension"),
    ):
        path.write_bytes(damaged)
        with pytest.raises(UserError, match=f"model.safetensors: cannot read safetensors.*{why}"):
            read_safetensors_file(path)


def test_the_writer_is_the_librarys_format_and_reads_deferred_tensors_in_turn(tmp_path):
    """store/hf.py writes safetensors itself, one tensor at a time: safetensors' own reader gives back every
    dtype and shape and the metadata, and a `Deferred` tensor is read only while the file is written."""
    from safetensors import safe_open

    from llmstages.store.hf import Deferred, write_safetensors

    tensors = {**every_dtype(), "t": torch.randn(4, 6).t()}  # and one not contiguous
    reads = []
    entries = dict(tensors)
    for k in ("bf16", "f64"):
        v = tensors[k]
        entries[k] = Deferred(tuple(v.shape), v.dtype, lambda v=v, k=k: reads.append(k) or v.clone())
    path = tmp_path / "x.safetensors"
    write_safetensors(path, entries, metadata={"format": "pt"})
    assert sorted(reads) == ["bf16", "f64"]
    got = load_file(path)
    assert got.keys() == tensors.keys()
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in tensors.items())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    wrong = {"x": Deferred((2,), torch.float32, lambda: torch.zeros(3))}
    with pytest.raises(RuntimeError, match="'x' came as"):
        write_safetensors(tmp_path / "y.safetensors", wrong)


LOAD_PEAK = """import json, sys, torch
from llmstages.model import GPT, preset
from llmstages.store import load_model
from llmstages.train.memory_probe import high_water, reset_high_water
with torch.device("meta"):
    GPT(preset("llama_tiny"))  # what building on the meta device imports once (~80 MiB), outside the window
reset_high_water()
base = high_water()
model = load_model(sys.argv[1])
held = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak": high_water() - base, "held": held, "saved": str(model.saved_dtype)}))
"""


def test_a_bf16_checkpoint_loads_in_fp32_without_a_second_copy_of_the_model(tmp_path):
    """Loading converts each tensor as it is read: the resident peak of loading a bf16 directory into fp32 is the
    fp32 model and one tensor's worth, not the bf16 file held beside the fp32 model (1.5x the fp32 bytes)."""
    import subprocess
    import sys

    from llmstages.model import GPT, preset

    torch.manual_seed(0)
    cfg = preset("llama_tiny", vocab_size=2048, d_model=512, n_heads=8, n_kv_heads=8, d_ff=1536, n_layers=8)
    save_model(GPT(cfg).to(torch.bfloat16), tmp_path / "m")
    r = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path / "m")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["saved"] == "torch.bfloat16" and got["held"] > 100e6
    assert got["peak"] < 1.25 * got["held"], got


def test_pickle_only_is_refused(tmp_path):
    hf_model("gpt2").save_pretrained(tmp_path, safe_serialization=False)
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    if not any(tmp_path.glob("*.bin")):
        torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="safetensors only"):
        load_model(tmp_path)


def test_export_refuses_what_hf_cannot_express(tmp_path):
    from llmstages.model import GPT, preset

    model = GPT(preset("gpt2_tiny", mlp_bias=False, n_layers=1))
    with pytest.raises(UserError, match="GPT-2 has biases"):
        export_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
