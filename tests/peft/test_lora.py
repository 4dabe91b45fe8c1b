"""LoRA, DoRA and adapters: closed-form identities, and parity with the `peft` library on a transformers model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmstages.errors import UserError
from llmstages.model import GPT, preset
from llmstages.peft import (
    LoRALinear,
    adapter_state_dict,
    apply_adapters,
    apply_lora,
    disable_adapters,
    merge_lora,
    merged_for_sampling,
    trainable_parameters,
)
from llmstages.store import export_hf, load_model
from llmstages.store.adapter import load_adapter, save_adapter
from llmstages.store.peft import export_peft
from tests.helpers import hf_model, save_hf


def _randomise(module: nn.Module) -> None:
    """Move the adapter away from its (identity) initialisation."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name or "_adapter.up_proj" in name:
                p.normal_(0, 0.1)
            if "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_lora_linear_identities(kind):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    lora = LoRALinear.from_linear(base, rank=4, alpha=8, use_rslora=kind == "rslora", use_dora=kind == "dora")
    x = torch.randn(3, 5, 16)
    w0 = base.weight.detach().clone()
    assert torch.allclose(lora(x), base(x), atol=1e-6)  # at init the output is the base's
    _randomise(lora)
    expected_scaling = 8 / 2 if kind == "rslora" else 8 / 4
    assert lora.scaling == expected_scaling
    # closed form: W' = W + s B A (LoRA); m * (W + s B A) / ||W + s B A||_row (DoRA)
    w = w0 + expected_scaling * lora.lora_B.weight @ lora.lora_A.weight
    if kind == "dora":
        w = lora.lora_magnitude_vector[:, None] * w / w.norm(dim=1, keepdim=True)
    y = lora(x)
    assert torch.allclose(y, x @ w.T + base.bias, atol=1e-5)
    lora.merge()
    assert torch.allclose(lora(x), y, atol=1e-5)
    lora.unmerge()
    assert torch.allclose(lora.weight, w0, atol=1e-6)
    assert torch.allclose(lora(x), y, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora", "adapter"])
def test_only_adapter_parameters_train_and_disable_gives_the_base(method):
    torch.manual_seed(0)
    model = GPT(preset("llama_tiny", vocab_size=128, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2))
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        base_logits = model(x)
    if method == "adapter":
        apply_adapters(model, bottleneck=8)
    else:
        apply_lora(model, rank=4, alpha=8, target_modules="all-linear", use_dora=method == "dora")
    with torch.no_grad():
        assert torch.allclose(model(x), base_logits, atol=1e-5)  # identity at init
    _randomise(model)
    model(x).sum().backward()
    for name, p in model.named_parameters():
        is_peft = ".lora_" in name or "_adapter." in name
        assert p.requires_grad == is_peft, name
        assert (p.grad is not None) == is_peft, name
    with torch.no_grad():
        assert not torch.allclose(model(x), base_logits, atol=1e-3)
        with disable_adapters(model):
            assert torch.allclose(model(x), base_logits, atol=1e-5)
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < 0.5 * total


def test_save_load_and_merge(tmp_path):
    torch.manual_seed(0)
    model = GPT(preset("llama_tiny", vocab_size=128, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    _randomise(model)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = model(x)
    save_adapter(model, tmp_path)
    fresh = GPT(model.config)
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.allclose(fresh(x), expected, atol=1e-6)
        merged = merge_lora(fresh)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert torch.allclose(merged(x), expected, atol=1e-5)
    assert set(merged.state_dict()) == set(base_state)  # merged: the plain model's names again


def test_target_modules_that_match_nothing():
    model = GPT(preset("llama_tiny", n_layers=1))
    with pytest.raises(UserError, match=r"matched no linear module; there are: .*q_proj"):
        apply_lora(model, target_modules=["qq_proj"])


@pytest.mark.parametrize("use_dora", [False, True])
def test_trained_lora_exports_to_peft_and_matches(tmp_path, use_dora):
    """Train a LoRA a few steps on an HF-imported Llama; load it with peft into transformers: same logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    src = save_hf(hf_model("llama"), tmp_path / "hf")
    model = load_model(src)
    apply_lora(model, rank=4, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
               use_dora=use_dora)  # fmt: skip
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 300, (4, 16))
    for _ in range(5):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(next(p for n, p in model.named_parameters() if "lora_B" in n).abs().sum()) > 0
    with disable_adapters(model):
        export_hf(model, tmp_path / "base")  # the frozen base, in HF format
    export_peft(model, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (theirs(x).logits - model.eval()(x)).abs().max() < 1e-4


def test_adapter_state_has_only_peft_tensors():
    model = GPT(preset("gpt2_tiny", n_layers=1))
    apply_adapters(model, bottleneck=4)
    keys = set(adapter_state_dict(model))
    assert keys == {f"blocks.0.{s}_adapter.{p}.{w}" for s in ("attn", "mlp") for p in ("down_proj", "up_proj")
                    for w in ("weight", "bias")}  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_for_sampling_samples_the_same_and_leaves_the_weights_untouched(method):
    """Sampling from merged weights: the same greedy and seeded tokens as the unmerged layers, per-token log-probs
    within 1e-5 (fp32), logits equal to `merge_lora` of a copy; afterwards every parameter keeps its bits. Under
    bf16 autocast it does not merge (W + s B A would be rounded to bf16)."""
    import copy

    from llmstages.model.generate import generate

    torch.manual_seed(0)
    model = GPT(preset("llama_tiny", vocab_size=128, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2))
    apply_lora(model, rank=4, alpha=8, target_modules="all-linear", use_dora=method == "dora")
    _randomise(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]

    def sample(temperature: float):
        gen = torch.Generator().manual_seed(3)
        return generate(model, prompts, 12, temperature=temperature, generator=gen)

    want = [sample(0.0), sample(1.0)]
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        merged_logits = merge_lora(copy.deepcopy(model))(x)
    with merged_for_sampling(model) as merged:
        assert merged
        got = [sample(0.0), sample(1.0)]
        with torch.no_grad():
            torch.testing.assert_close(model(x), merged_logits, rtol=0, atol=1e-5)
    for w, g in zip(want, got):
        assert torch.equal(g.tokens, w.tokens)
        torch.testing.assert_close(g.logprobs, w.logprobs, rtol=0, atol=1e-5)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(m.sampling_weight is None for m in model.modules() if isinstance(m, LoRALinear))
    with torch.autocast("cpu", dtype=torch.bfloat16), merged_for_sampling(model) as merged:
        assert not merged
        assert all(m.sampling_weight is None for m in model.modules() if isinstance(m, LoRALinear))


def _fused(y: torch.Tensor) -> bool:
    """Whether `y` (a LoRA layer's output, reshaped back from rows) came from the fused product."""
    fns = [y.grad_fn] + [f for f, _ in y.grad_fn.next_functions]
    return any(f is not None and "LoRAProduct" in type(f).__name__ for f in fns)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_fused_lora_product_equals_the_textbook_formula(bias, input_grad):
    """A LoRA layer's fused product (the adapter's product accumulated into the base's, forward and backward) gives
    y = x W^T + b + s (x A^T) B^T and the gradients of x, A and B that autograd gives for that formula in fp64
    (fp32, 1e-5); the frozen W and b get none; dropout in training mode takes the unfused path, with the same
    result when it drops nothing."""
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(48, 40, bias=bias), rank=4, alpha=8)
    _randomise(layer)
    x = torch.randn(3, 7, 48, requires_grad=input_grad)
    up = torch.randn(3, 7, 40)
    y = layer(x)
    (y * up).sum().backward()
    assert _fused(y)  # the fused path ran
    ref = {n: p.detach().double().requires_grad_(n.startswith("lora")) for n, p in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_(input_grad)
    b = ref["bias"] if bias else 0
    y64 = x64 @ ref["weight"].T + b + layer.scaling * (x64 @ ref["lora_A.weight"].T) @ ref["lora_B.weight"].T
    (y64 * up.double()).sum().backward()
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    for name in ("lora_A.weight", "lora_B.weight"):
        got = dict(layer.named_parameters())[name].grad
        torch.testing.assert_close(got, ref[name].grad.float(), rtol=1e-5, atol=1e-5)
    if input_grad:
        torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and (not bias or layer.bias.grad is None)
    dropped = LoRALinear.from_linear(nn.Linear(48, 40, bias=bias), rank=4, alpha=8, dropout=1e-9)
    dropped.load_state_dict(layer.state_dict())
    y_drop = dropped.train()(x)
    assert not _fused(y_drop)
    torch.testing.assert_close(y_drop, y, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # sampling and scoring: the same product without an autograd node
        assert torch.equal(layer(x), y)


def test_fused_lora_product_under_bf16_autocast():
    """Under bf16 autocast the fused product multiplies in bf16 as autocast's unfused layer does: a bf16 output
    within bf16 rounding of the fp64 formula, fp32 gradients for A and B within bf16 rounding of fp64's."""
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(64, 32), rank=8, alpha=16)
    _randomise(layer)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and _fused(y)
    p = {n: t.detach().double().requires_grad_(n.startswith("lora")) for n, t in layer.named_parameters()}
    y64 = (
        x.double() @ p["weight"].T
        + p["bias"]
        + layer.scaling * (x.double() @ p["lora_A.weight"].T) @ p["lora_B.weight"].T
    )
    y64.sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)
    for name in ("lora_A.weight", "lora_B.weight"):
        got = dict(layer.named_parameters())[name].grad
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), p[name].grad, rtol=3e-2, atol=3e-2)
