"""QLoRA's NF4 base (peft/nf4.py): the levels against the paper's construction, the quantization against torchao's
NF4Tensor, and a QLoRA layer and model against LoRA over the dequantized base."""

from __future__ import annotations

import copy

import pytest
import torch

from llmstages.model import GPT, preset
from llmstages.peft import LoRALinear, apply_lora, merge_lora, quantize_frozen
from llmstages.peft.nf4 import NF4_LEVELS, NF4Linear, NF4Weight
from llmstages.train.frozen import quantized_weights, restore_frozen


def test_levels_are_the_papers_normal_quantiles():
    """QLoRA's NF4 (Dettmers et al. 2023, eq. 4 and Appendix E): 8 positive quantiles of N(0, 1) between 1/2 and
    offset, 7 negative ones, and zero, normalised to [-1, 1]; offset = 0.9677083 = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2
    (bitsandbytes' create_normal_map). Recomputed here from the normal quantile function."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    levels = levels / levels.abs().max()
    assert torch.allclose(torch.tensor(NF4_LEVELS, dtype=torch.float64), levels, atol=1e-6)


def _torchao_nf4():
    pytest.importorskip("torchao")
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    return to_nf4


@pytest.mark.parametrize(("shape", "group"), [((128, 256), 256), ((576, 192), 64), ((96, 32), 16)])
def test_quantization_equals_torchaos(shape, group):
    """With torchao's levels (the paper's, rounded to four decimals), our codes, scales, factors and mean are
    torchao's NF4Tensor's bit for bit, and so is the dequantized weight; with ours, the weights are within the
    rounding of those levels of theirs, but for the few that lie at a midpoint between two levels."""
    to_nf4 = _torchao_nf4()
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    w[0, :64] = 0.3  # a block far from normal
    theirs = to_nf4(w, 64, group)
    ours = NF4Weight.quantize(w, levels=theirs.nf4)
    assert ours.scale_group == group
    assert torch.equal(ours.codes, theirs.quantized_data)
    assert torch.equal(ours.scales, theirs.quantized_scalers)
    assert torch.equal(ours.factors, theirs.quantization_factor)
    assert torch.equal(ours.mean, theirs.scaler_mean)
    assert torch.equal(ours.dequantize(), theirs.get_original_weight())
    paper = NF4Weight.quantize(w)  # levels 5e-5 apart at most: a weight moves by that x its scale, or (within
    scale = paper.block_scales().repeat_interleave(64).view(shape)  # that of a midpoint) to the next level
    close = (paper.dequantize() - theirs.get_original_weight()).abs() <= 5e-5 * scale + 1e-9
    assert close.float().mean() >= 0.999


def test_round_trip_is_within_half_a_level_of_the_stored_scale():
    """Each weight comes back as its nearest level times its block's stored absmax: the error is at most half the
    widest gap between levels (0.16 of the absmax) plus what storing the absmax in 8 bits costs."""
    torch.manual_seed(1)
    w = torch.randn(256, 128)
    q = NF4Weight.quantize(w)
    absmax = w.view(-1, 64).abs().amax(1)
    stored = q.block_scales()
    assert ((stored - absmax).abs() <= (absmax - absmax.mean()).abs().max() / 127 + 1e-6).all()
    err = (q.dequantize() - w).view(-1, 64).abs()
    half_gap = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2
    assert (err <= half_gap * stored[:, None] + (stored - absmax).abs()[:, None] + 1e-6).all()
    assert q.codes.numel() + q.scales.numel() + 4 * q.factors.numel() + 4 < 0.14 * 4 * w.numel()  # < 0.56 B/weight


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_layer_equals_lora_over_the_dequantized_base(dora):
    """Forward, and the gradients of the input and the adapter, of a LoRA/DoRA layer over an NF4 base equal those
    of the same layer over the dequantized base (fp32, 1e-5); nothing of the weight's size is saved for backward."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    qlora = LoRALinear.from_linear(lin, rank=4, alpha=8, use_dora=dora)
    torch.nn.init.normal_(qlora.lora_B.weight, std=0.1)
    q = NF4Weight.quantize(qlora.weight)
    lora = copy.deepcopy(qlora)
    lora.weight = torch.nn.Parameter(q.dequantize(), requires_grad=False)
    del qlora.weight
    qlora.weight = q
    if dora:  # both start from the quantized base's row norms
        for m in (lora, qlora):
            m.lora_magnitude_vector.data.copy_(q.dequantize().norm(dim=1))
    x = torch.randn(3, 5, 128, requires_grad=True)
    outs, grads = [], []
    for m in (lora, qlora):
        x.grad = None
        m.zero_grad()
        y = m(x)
        (y * torch.linspace(-1, 1, 64)).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters() if p.requires_grad])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_qlora_under_bf16_autocast_multiplies_what_autocast_would():
    """Under bf16 autocast the NF4 weight is dequantized straight to bf16: the products equal autocast over the
    dequantized fp32 weight, bit for bit, forward and backward."""
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    q = NF4Weight.quantize(w)
    dense = q.dequantize()
    x = torch.randn(4, 128, requires_grad=True)
    results = []
    for layer in (NF4Linear(q, None), lambda t: torch.nn.functional.linear(t, dense)):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().pow(2).sum().backward()
        results.append((y, x.grad.clone()))
    assert results[0][0].dtype == torch.bfloat16
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _tiny_lora_model(targets) -> GPT:
    torch.manual_seed(0)
    m = GPT(preset("llama_tiny", vocab_size=96, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, block_size=32))
    apply_lora(m, rank=4, alpha=8, target_modules=targets)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return m


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_a_quantized_model_equals_its_dequantized_weights_and_gives_the_originals_back(targets):
    """quantize_frozen holds every frozen linear weight of the blocks in NF4 (adapted or not), never the output
    head or the embeddings; the model's logits are those of the same model with the dequantized weights put in;
    restore_frozen puts the original weights back, and merge_lora of a quantized model merges into the dequantized
    base."""
    model = _tiny_lora_model(targets)
    original = copy.deepcopy(model)
    names = quantize_frozen(model)
    assert names == quantized_weights(model)
    assert sorted(names) == sorted(
        n
        for n, p in original.named_parameters()
        if not p.requires_grad and "blocks." in n and n.endswith("proj.weight")
    )
    assert isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.lm_head.weight, torch.nn.Parameter)
    dequantized = copy.deepcopy(model)
    merged_q = merge_lora(copy.deepcopy(model))  # every NF4 weight dequantized, then LoRA merged
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged_q(x), model(x), rtol=1e-4, atol=1e-4)
        restore_frozen(dequantized, names, {n: dict(model.named_modules())[n].dequantize() for n in names})
        assert quantized_weights(dequantized) == []
        torch.testing.assert_close(model(x), dequantized(x), rtol=1e-5, atol=1e-5)
        restore_frozen(model, names, original.state_dict())
        now, before = model.state_dict(), original.state_dict()
        assert now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
