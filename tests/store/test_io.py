"""Model directories by hub id from the local Hugging Face cache (the documented layout, no network), and the
error naming where it looked."""

from __future__ import annotations

import pytest

from llmstages.cli import main
from llmstages.errors import UserError
from llmstages.store import load_model, load_tokenizer
from llmstages.store.io import resolve_model_path
from tests.helpers import hf_model, save_hf, tiny_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A hub cache holding owner/tiny at one commit, main pointing at it, and a tag v1 pointing at it too."""
    root = tmp_path / "hub"
    repo = root / "models--owner--tiny"
    save_hf(hf_model("llama"), repo / "snapshots" / COMMIT, tiny_tokenizer())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(COMMIT + "\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.chdir(tmp_path)  # "owner/tiny" is not a folder here
    return repo / "snapshots" / COMMIT


def test_a_hub_id_resolves_to_its_snapshot(cache):
    for name in ("owner/tiny", "owner/tiny@v1", f"owner/tiny@{COMMIT}"):
        assert resolve_model_path(name) == cache
    assert load_model("owner/tiny").config.n_layers == load_model(cache).config.n_layers
    assert load_tokenizer("owner/tiny").vocab_size == load_tokenizer(cache).vocab_size


def test_hf_home_layout(cache, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # $HF_HOME/hub is the fixture's cache
    assert resolve_model_path("owner/tiny") == cache


def test_not_in_the_cache(cache, capsys):
    with pytest.raises(UserError, match=r"'owner/other' does not exist, and as a hub id it is not in the local"):
        resolve_model_path("owner/other")
    with pytest.raises(UserError, match=r"not in the local Hugging Face cache \(.*hub"):
        resolve_model_path("owner/tiny@v2")  # no such ref
    assert main(["generate", "--model", "owner/missing", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "hub" in err and err.count("\n") == 1
    with pytest.raises(UserError, match=r"model directory 'no_such_dir' does not exist$"):
        resolve_model_path("no_such_dir")


@pytest.mark.parametrize(
    ("ref", "says"),
    [(b"", "is empty"), (b"\x89PNG\r\n\x1a\n\x00\x00", r"does not hold a commit hash \(40 hex digits\)")],
)
def test_a_damaged_ref_is_named(cache, capsys, ref, says):
    """An empty or binary refs/main: the ref named, not a traceback or "a snapshots folder without config.json"."""
    main_ref = cache.parents[1] / "refs" / "main"
    main_ref.write_bytes(ref)
    with pytest.raises(UserError, match=rf"refs/main {says}: the cached copy of owner/tiny is damaged"):
        resolve_model_path("owner/tiny")
    assert resolve_model_path("owner/tiny@v1") == cache  # the other ref still resolves
    assert main(["generate", "--model", "owner/tiny", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_symlinks_that_lead_nowhere_are_named(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(UserError, match=r"model directory '.*/a' is a symlink loop"):
        resolve_model_path(tmp_path / "a")
    with pytest.raises(UserError, match=r"model directory '.*/a/model' is a symlink loop"):
        resolve_model_path(tmp_path / "a" / "model")  # a loop above the path
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match=r"'.*/dangling' is a symlink to '.*/gone', which does not exist$"):
        resolve_model_path(tmp_path / "dangling")


@pytest.mark.parametrize(("kind", "method"), [("gpt2", "lora"), ("llama", "dora")])
def test_a_base_quantized_as_it_is_read_trains_as_one_quantized_after_loading(tmp_path, kind, method):
    """load_model(quantize_base="nf4") holds each linear weight in NF4 as it reads it (GPT-2's fused, transposed
    c_attn cut first). A LoRA/DoRA readied over it is the same model, bit for bit, as one loaded whole and
    quantized after (`peft.prepare_policy`, the way a directory with an adapter still goes): the same codes,
    logits and gradients."""
    import torch

    from llmstages.peft import prepare_policy
    from llmstages.peft.nf4 import NF4Linear
    from llmstages.train.frozen import quantized_weights

    path = save_hf(hf_model(kind, tie_word_embeddings=False), tmp_path / "hf")
    early = load_model(path, quantize_base="nf4")
    linear = [n for n, m in early.named_modules() if isinstance(m, NF4Linear)]
    assert len(linear) == 2 * 7 - (kind == "gpt2") * 2  # GPT-2 has no gate: q, k, v, o, fc, proj
    models = []
    for m in (early, load_model(path)):
        torch.manual_seed(1)
        prepare_policy(m, method, quantize_base="nf4", rank=4, target_modules=["q_proj", "v_proj"])
        models.append(m)
    a, b = models
    assert quantized_weights(a) == quantized_weights(b) and len(quantized_weights(a)) == len(linear)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    outs = [m(ids) for m in (a, b)]
    assert torch.equal(outs[0], outs[1])
    for out in outs:
        out.float().square().mean().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (a, b)]
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


QLORA_PEAKS = """import json, sys, torch
from llmstages.model import GPT, preset
from llmstages.peft import prepare_policy
from llmstages.store import load_model, save_model
from llmstages.train.frozen import base_weights, hold_frozen, quantized_weights, restore_frozen
from llmstages.train.memory_probe import high_water, reset_high_water
with torch.device("meta"):
    GPT(preset("llama_tiny"))  # what building on the meta device imports once, outside the windows
reset_high_water()
base = high_water()
model = load_model(sys.argv[1], quantize_base="nf4")
load = high_water() - base
prepare_policy(model, "lora", quantize_base="nf4", rank=4, target_modules="all-linear")
held = hold_frozen(model, "bf16") + quantized_weights(model)
reset_high_water()
base = high_water()
restore_frozen(model, held, base_weights(sys.argv[1]))
save_model(model, sys.argv[2])
print(json.dumps({"load": load, "save": high_water() - base}))
"""


def test_qlora_never_holds_the_base_whole_to_load_it_or_to_save_it(tmp_path):
    """A QLoRA run's base is quantized as it is read, and its final model is written with the base read back from
    the original file one tensor at a time. The resident peak of loading a bf16 directory is about the NF4 model
    (a sixth of the fp32 bytes here, with the embedding and head) and a few tensors in flight; of saving it, a few
    tensors. Reading the model whole first, or restoring its originals before saving, would take the fp32 bytes.
    The saved base is the original, tensor for tensor."""
    import json
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from llmstages.model import GPT, preset
    from llmstages.store import save_model

    torch.manual_seed(0)
    cfg = preset("llama_tiny", vocab_size=2048, d_model=512, n_heads=8, n_kv_heads=8, d_ff=1536, n_layers=8)
    save_model(GPT(cfg).to(torch.bfloat16), tmp_path / "m")
    fp32 = 4 * sum(p.numel() for p in GPT(cfg).parameters())
    # glibc's default keeps some freed tensors of a few MB in its heap, at random from run to run (measured 33 or
    # 88 MB here); with a fixed mmap threshold, as `estimate-memory --measure` runs, the peak is what was live
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run(
        [sys.executable, "-c", QLORA_PEAKS, str(tmp_path / "m"), str(tmp_path / "final")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["load"] < 0.4 * fp32 and got["save"] < 0.1 * fp32, (got, fp32)
    want, saved = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "final" / "model.safetensors")
    assert saved.keys() == want.keys() and all(
        torch.equal(saved[k], v) and saved[k].dtype == v.dtype for k, v in want.items()
    )


def test_a_trained_qlora_model_merges_into_its_original_weights_as_before_the_deferred_save(tmp_path):
    """A QLoRA model whose originals are left in their files at the end of training (`restore_frozen` with
    `base_weights`) merges, and exports, into those originals: the same weights as when they were put back
    dense first; the NF4 base is not what gets merged."""
    import copy

    import torch

    from llmstages.peft import merge_lora, prepare_policy
    from llmstages.store import export_hf
    from llmstages.train.frozen import base_weights, hold_frozen, quantized_weights, restore_frozen

    path = save_hf(hf_model("qwen2", tie_word_embeddings=False), tmp_path / "hf")  # q/k/v biases held too
    model = load_model(path, quantize_base="nf4")
    prepare_policy(model, "lora", quantize_base="nf4", rank=4, target_modules="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained adapter
    held = hold_frozen(model, "bf16") + quantized_weights(model)
    dense = copy.deepcopy(model)
    restore_frozen(dense, held, dict(base_weights(path)))  # the originals put back, as before
    restore_frozen(model, held, base_weights(path))  # left in the file
    assert quantized_weights(model) and not quantized_weights(dense)
    want = merge_lora(dense).state_dict()
    got = merge_lora(copy.deepcopy(model)).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    export_hf(model, tmp_path / "out")
    assert quantized_weights(model)  # exporting merged a copy
    back = load_model(tmp_path / "out").state_dict()
    assert all(torch.equal(back[k], want[k].to(back[k].dtype)) for k in back)
