"""Frozen weights held in the compute dtype (train/frozen.py): the same products as autocast, losses that track
the fp32 run, and saved models that keep the dtype and values they were loaded with."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from llmstages import losses as L
from llmstages.cli import main
from llmstages.model import GPT, preset
from llmstages.monitor.metrics import read_metrics
from llmstages.peft import apply_lora, quantize_frozen
from llmstages.store import load_model
from llmstages.train import frozen
from llmstages.train.frozen import hold_frozen, restore_frozen
from tests.helpers import builtin_base, hf_model, save_hf, tiny_tokenizer

FAST = [
    "train.batch_size=4", "train.seq_len=48", "train.log_every=1", "train.eval_every=100", "train.save_every=100",
    "train.warmup_steps=2", "data.max_eval_examples=8", "peft.method=lora", "peft.target_modules=[all-linear]",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return builtin_base(tmp_path_factory.mktemp("base") / "model")


def _lora_model(tie: bool, dora: bool = False) -> GPT:
    torch.manual_seed(0)
    m = GPT(preset("llama_tiny", vocab_size=96, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, block_size=32,
                   tie_embeddings=tie))  # fmt: skip
    apply_lora(m, rank=4, alpha=8, target_modules="all-linear", use_dora=dora)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained adapter, so that it takes part in the products
    return m


@pytest.mark.parametrize("tie", [True, False])
def test_held_weights_give_autocasts_products(tie):
    """Under bf16 autocast, holding the frozen linear weights in bf16 changes nothing: autocast rounds an fp32
    weight to the same bf16 values on every call. Outputs, the fused LM loss (which multiplies the head in fp32:
    a bf16 copy of an untied head would change it) and adapter gradients equal, bit for bit."""
    ref = _lora_model(tie)
    held = copy.deepcopy(ref)
    names = hold_frozen(held, "bf16")
    assert names and all(".lora_" not in n for n in names)
    assert "tok_emb.weight" not in names and not any("norm" in n for n in names)
    assert "lm_head.weight" not in names  # the fused losses multiply the head in fp32
    assert held.tok_emb.weight.dtype == torch.float32 and held.blocks[0].attn.q_proj.weight.dtype == torch.bfloat16
    x = torch.randint(0, 96, (2, 16))
    batch = {"input_ids": x, "targets": torch.randint(0, 96, (2, 16))}
    outs, losses, grads = [], [], []
    for m in (ref, held):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
            loss = L.lm_loss(m, batch)[0]
        (y.float().square().mean() + loss).backward()
        outs.append(y)
        losses.append(loss)
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert grads[1][n].dtype == torch.float32  # adapters and their gradients stay fp32
        assert torch.equal(grads[0][n], grads[1][n]), n


@pytest.mark.parametrize("tie", [True, False])
def test_held_embeddings_give_autocasts_products(tie):
    """QLoRA also holds the token embedding and output head in bf16 (`hold_embeddings`). Against an fp32 model
    whose embedding and head already hold bf16 values: lookups come back fp32 and equal, the logits and the fused
    losses' forward values equal bit for bit (autocast multiplies in bf16 either way); the fused losses' d h is now
    a bf16 product, as an unfused head's is (tests/test_losses.py). Restoring puts the fp32 originals back, a tied
    pair as one tensor."""
    ref = _lora_model(tie)
    with torch.no_grad():
        for w in {id(p): p for p in (ref.tok_emb.weight, ref.lm_head.weight)}.values():
            w.copy_(w.bfloat16().float())
    held = copy.deepcopy(ref)
    names = frozen.hold_embeddings(held, torch.bfloat16)
    assert "tok_emb.weight" in names and "lm_head.weight" in names
    assert held.tok_emb.weight.dtype == held.lm_head.weight.dtype == torch.bfloat16
    qlora = copy.deepcopy(ref)
    quantize_frozen(qlora)
    assert {"tok_emb.weight", "lm_head.weight"} <= set(hold_frozen(qlora, "bf16"))  # hold_frozen does it for QLoRA
    assert (held.tok_emb.weight is held.lm_head.weight) == tie
    x = torch.randint(0, 96, (2, 16))
    t = torch.randint(0, 96, (2, 16))
    assert held.tok_emb(x).dtype == torch.float32 and torch.equal(held.tok_emb(x), ref.tok_emb(x))
    outs = []
    for m in (ref, held):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = L.lm_loss(m, {"input_ids": x, "targets": t})[0]
            outs.append((m(x), loss, *L.head_logprobs(m.hidden_states(x), m.lm_head, t)))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    fp32 = copy.deepcopy(ref)
    restore_frozen(held, names, fp32.state_dict())
    assert held.tok_emb.weight.dtype == torch.float32 and (held.tok_emb.weight is held.lm_head.weight) == tie
    for k, v in fp32.state_dict().items():
        assert torch.equal(held.state_dict()[k], v), k


def test_held_lora_without_autocast_computes_in_the_held_dtype():
    """Called outside autocast (a user's own loop), a held LoRA layer computes as autocast would."""
    ref, held = _lora_model(False), _lora_model(False)
    hold_frozen(held, "bf16")
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = ref.blocks[0].attn.q_proj(ref.tok_emb(x))
        got = held.blocks[0].attn.q_proj(held.tok_emb(x))
    assert torch.equal(got, expected)


def test_dora_held_tracks_fp32():
    """DoRA's row norm reads the base weight itself: held in bf16 it is the norm of the rounded weight, within
    bf16's rounding of the fp32 model's outputs."""
    ref = _lora_model(False, dora=True)
    held = copy.deepcopy(ref)
    hold_frozen(held, "bf16")
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x).float(), held(x).float()
    assert (a - b).abs().max() <= 0.02 * a.abs().max()


def test_restore_puts_the_originals_back():
    ref = _lora_model(False)
    held = copy.deepcopy(ref)
    names = hold_frozen(held, "bf16")
    assert hold_frozen(copy.deepcopy(ref), "fp32") == []
    restore_frozen(held, names, ref.state_dict())
    for k, v in ref.state_dict().items():
        assert held.state_dict()[k].dtype == v.dtype and torch.equal(held.state_dict()[k], v), k
    with pytest.raises(RuntimeError, match="original"):
        restore_frozen(held, ["blocks.0.attn.q_proj.weight"], {})


def test_restore_finds_the_model_inside_a_wrapper():
    """A wrapper (PPO's policy beside a value head, a reward model's trunk) holds the GPT under an attribute; the
    originals, keyed as in the GPT, go back to it by its place, whatever the attribute is called."""
    ref = _lora_model(False)
    wrapper = nn.ModuleDict({"head": nn.Linear(4, 1), "trunk": copy.deepcopy(ref)})
    names = hold_frozen(wrapper, "bf16")
    assert names and all(n.startswith("trunk.") for n in names)
    restore_frozen(wrapper, names, ref.state_dict())
    for k, v in ref.state_dict().items():
        got = wrapper["trunk"].state_dict()[k]
        assert got.dtype == v.dtype and torch.equal(got, v), k


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r.get("event") != "start" and "loss" in r]


def test_bf16_lora_tracks_fp32_and_keeps_the_saved_weights(base_dir, tmp_path, monkeypatch):
    """20 LoRA SFT steps of a tiny model. bf16 with the frozen base held in bf16 equals bf16 autocast over fp32
    weights (the losses bit for bit), and tracks the fp32 run: the losses within 0.5% of fp32's on average and
    2.5% at every step. The saved base is the directory's fp32 weights, bit for bit."""
    steps = ["train.max_steps=20", "train.lr=1e-2"]
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16")):
        assert main(["sft", f"model.path={base_dir}", f"out_dir={tmp_path / name}", *FAST, *steps,
                     f"train.precision={precision}"]) == 0  # fmt: skip
    with monkeypatch.context() as mp:  # the same bf16 run with fp32 weights autocast casts on every call
        mp.setattr("llmstages.train.prepare.hold_frozen", lambda model, precision: [])
        assert main(["sft", f"model.path={base_dir}", f"out_dir={tmp_path / 'cast'}", *FAST, *steps,
                     "train.precision=bf16"]) == 0  # fmt: skip
    fp32, bf16, cast = (_losses(tmp_path / n) for n in ("fp32", "bf16", "cast"))
    assert len(fp32) == len(bf16) == 20
    assert bf16 == cast
    # Measured, seeds 0-2: the mean 0.007-0.09% and the worst step 0.03-1.1% on an AVX512-BF16 CPU without AMX
    # (a single batch's loss moves by up to 1.1% there, the others by < 0.2%); the worst step 0.14% on an AMX CPU.
    deviation = [abs(b - f) / f for b, f in zip(bf16, fp32)]
    assert sum(deviation) / len(deviation) <= 0.005 and max(deviation) <= 0.025, deviation
    assert fp32[-1] < 0.95 * fp32[0] and bf16[-1] < 0.95 * bf16[0]  # both learn
    base = load_file(str(base_dir / "model.safetensors"))
    for name in ("fp32", "bf16"):
        saved = load_file(str(tmp_path / name / "final" / "model.safetensors"))
        assert saved.keys() == base.keys()
        for k, v in base.items():
            assert saved[k].dtype == v.dtype and torch.equal(saved[k], v), (name, k)


def test_merged_reward_model_keeps_fp32(base_dir, tmp_path):
    """A LoRA reward model trained in bf16 is saved merged, in fp32: the untargeted tensors are the base's bit for
    bit and each targeted weight moved by a matrix of rank <= the LoRA rank (merged in fp32, not into bf16)."""
    assert main(["reward", f"model.path={base_dir}", f"out_dir={tmp_path}", "train.max_steps=3", "train.batch_size=4",
                 "train.seq_len=64", "train.warmup_steps=1", "train.eval_every=100", "train.save_every=100",
                 "train.lr=1e-2", "train.precision=bf16", "peft.method=lora", "peft.rank=4",
                 "peft.target_modules=[q_proj,v_proj]"]) == 0  # fmt: skip
    base = load_file(str(base_dir / "model.safetensors"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    for k, v in base.items():
        assert saved[k].dtype == torch.float32, k
        if k.endswith(("q_proj.weight", "v_proj.weight")):
            delta = (saved[k] - v).double()
            assert 0 < torch.linalg.matrix_rank(delta, rtol=1e-5) <= 4, k
        else:
            assert torch.equal(saved[k], v), k


def test_a_bf16_checkpoint_is_saved_in_bf16(tmp_path):
    """A Hugging Face checkpoint saved in bf16, fine-tuned with LoRA in fp32 (weights upcast on load), is saved
    and exported in bf16 again, its base weights unchanged."""
    hf = hf_model("llama").to(torch.bfloat16)
    src = save_hf(hf, tmp_path / "hf", tiny_tokenizer())
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "Where does Ada live?", "output": "Oakfield"}\n' * 4)
    assert main(["sft", f"model.path={src}", f"out_dir={tmp_path / 'run'}", *FAST, "train.max_steps=2",
                 "train.precision=fp32", "train.seq_len=32", f"data.path={data}",
                 f"data.val_path={data}"]) == 0  # fmt: skip
    model = load_model(tmp_path / "run" / "final")
    assert model.tok_emb.weight.dtype == torch.float32 and model.saved_dtype == torch.bfloat16
    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert main(["export", "--model", str(tmp_path / "run" / "final"), "--out", str(tmp_path / "out")]) == 0
    import transformers as tf

    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype="auto")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(back.model.embed_tokens.weight, hf.model.embed_tokens.weight)


def test_base_weights_merge_a_carried_lora(base_dir, tmp_path):
    """base_weights reads a LoRA SFT model as the stages load it: the adapter merged into the base."""
    assert main(["sft", f"model.path={base_dir}", f"out_dir={tmp_path}", *FAST, "train.max_steps=2",
                 "train.lr=1e-2", "train.precision=fp32"]) == 0  # fmt: skip
    from llmstages.peft import merge_lora

    expected = merge_lora(load_model(tmp_path / "final")).state_dict()
    got = frozen.base_weights(str(tmp_path / "final"))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
