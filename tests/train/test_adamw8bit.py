"""8-bit and 4-bit AdamW (train/adamw8bit.py) against torchao's AdamW8bit and AdamW4bit, run eagerly as the
references: the same quantization maps, the same codes and scales, the same steps; small tensors step as torch's
AdamW; a state dict saved and loaded mid-run resumes bit for bit; the state costs about 2 (1) bytes a
parameter."""

from __future__ import annotations

import io

import pytest
import torch

from llmstages.train.adamw8bit import (
    BLOCK,
    BLOCK_4BIT,
    AdamW4bit,
    AdamW8bit,
    QuantMap,
    dequantize,
    dynamic_map,
    linear_map,
    pack4,
    quantize,
    unpack4,
)

torchao_quant = pytest.importorskip("torchao.optim.quant_utils")


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_torchaos(signed):
    theirs = torch.tensor(torchao_quant.create_dynamic_map(signed=signed), dtype=torch.float32)
    ours = dynamic_map(signed)
    assert ours.shape == (256,) and torch.equal(ours, theirs)
    assert ours[-1] == 1.0 and (ours == 0).sum() == 1 and (ours < 0).sum() == (127 if signed else 0)


@pytest.mark.parametrize("signed", [True, False])
def test_codes_and_scales_are_torchaos(signed):
    torch.manual_seed(0)
    x = torch.randn(64 * BLOCK) * torch.logspace(-6, 0, 64).repeat_interleave(BLOCK)  # blocks of every magnitude
    x = x if signed else x.square()
    qmap = QuantMap.dynamic(signed)
    levels, mids = qmap.levels, (qmap.levels[:-1] + qmap.levels[1:]) / 2
    x = torch.cat((x, levels * 0.37, mids * 0.37, *([-mids * 0.37] if signed else [])))  # on levels and midpoints
    x = torch.cat((x, x.new_zeros(-len(x) % BLOCK)))
    codes, scales = quantize(x, qmap)
    scaled, their_scales = torchao_quant.scale_tensor(x, BLOCK)
    their_codes = torchao_quant.quantize_8bit_with_qmap(scaled, levels)
    assert torch.equal(scales, their_scales)
    assert torch.equal(codes, torch.bucketize(scaled, mids, right=True).to(torch.uint8))  # the nearest, ties up
    assert (codes != their_codes).sum() <= 2  # torchao rounds by x - low >= (high - low) / 2: other ties, at most
    back = dequantize(codes, scales, qmap)
    assert torch.equal(back, torchao_quant.dequant_with_qmap(codes, levels, scales))
    assert ((back - x).abs() <= scales.repeat_interleave(BLOCK) * 0.07).all()  # widest gap between levels / 2


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(1)
    shapes = [(64, 128), (256, 64), (32,), (10, 10)]  # two quantized, two small ones in fp32
    return [torch.nn.Parameter(torch.randn(s) * 0.5) for s in shapes]


def _grads(step: int, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) * 10 ** (-step % 3) for p in params]


def _run(opt_cls, params, steps, **kw):
    opt = opt_cls([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}],
                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw)  # fmt: skip
    for t in range(steps):
        for p, g in zip(params, _grads(t, params)):
            p.grad = g
        opt.step()
    return opt


@pytest.mark.parametrize(("opt_cls", "unpack"), [(AdamW8bit, lambda c: c), (AdamW4bit, unpack4)], ids=["8bit", "4bit"])
def test_steps_follow_torchaos(monkeypatch, opt_cls, unpack):
    """Six steps on two quantized tensors and two small ones: the weights within 1e-6 of torchao's AdamW8bit /
    AdamW4bit run eagerly (its update is compiled otherwise); the moments' codes (unpacked) equal nearly
    everywhere (a value on the edge between two levels can round either way after float differences)."""
    import torchao.optim

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    ours, theirs = _params(), _params()
    opt = _run(opt_cls, ours, 6)
    ref = _run(getattr(torchao.optim, opt_cls.__name__), theirs, 6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for p, q in zip(ours[:2], theirs[:2]):
        for name in ("exp_avg", "exp_avg_sq"):
            codes, their = unpack(opt.state[p][f"{name}_codes"]), unpack(ref.state[q][name].codes.view(-1))
            assert (codes != their).float().mean() < 1e-3
            torch.testing.assert_close(opt.state[p][f"{name}_scales"], ref.state[q][name].scale, rtol=1e-5, atol=0)


def test_small_tensors_step_as_torch_adamw():
    ours, theirs = _params(), _params()
    _run(AdamW8bit, ours, 6)
    _run(torch.optim.AdamW, theirs, 6, foreach=False)
    for a, b in zip(ours[2:], theirs[2:]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    drift = max(float((a - b).detach().abs().max()) for a, b in zip(ours[:2], theirs[:2]))
    assert 0 < drift < 1e-2  # the quantized moments move the big ones a little off fp32 AdamW


@pytest.mark.parametrize("opt_cls", [AdamW8bit, AdamW4bit])
def test_state_dict_resumes_bit_for_bit(opt_cls):
    straight = _params()
    _run(opt_cls, straight, 6)
    params = _params()
    opt = _run(opt_cls, params, 3)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = [torch.nn.Parameter(p) for p in saved["params"]]
    opt2 = opt_cls([{"params": resumed[:2], "weight_decay": 0.1}, {"params": resumed[2:], "weight_decay": 0.0}],
                     lr=1e-2, betas=(0.9, 0.95), eps=1e-8)  # fmt: skip
    opt2.load_state_dict(saved["opt"])
    codes = [t for st in opt2.state.values() for k, t in st.items() if k.endswith("_codes")]
    assert len(codes) == 4 and all(t.dtype == torch.uint8 for t in codes)  # as small as before the save
    for t in range(3, 6):
        for p, g in zip(resumed, _grads(t, resumed)):
            p.grad = g
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


@pytest.mark.parametrize(("opt_cls", "per_value"), [(AdamW8bit, 2 * (1 + 4 / BLOCK)), (AdamW4bit, 2 * (0.5 + 4 / 128))])
def test_state_is_about_two_or_one_bytes_a_parameter(opt_cls, per_value):
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    opt = opt_cls([p])
    p.grad = torch.randn_like(p)
    opt.step()
    state = sum(t.numel() * t.element_size() for t in opt.state[p].values() if t.dim() > 0)
    assert state / p.numel() == pytest.approx(per_value)


def test_4bit_maps_are_torchaos():
    """The first moment's 16 levels are torchao's dynamic map with 3 exponent bits; the second's its linear map
    1/16 .. 1, without zero."""
    theirs = torch.tensor(torchao_quant.create_dynamic_map(True, 3, 4), dtype=torch.float32)
    assert torch.equal(dynamic_map(True, bits=4), theirs) and (theirs == 0).sum() == 1
    from torchao.optim.subclass_4bit import get_qmap_unsigned

    assert torch.equal(linear_map(4), torch.tensor(get_qmap_unsigned(), dtype=torch.float32))
    codes = torch.randint(0, 16, (64,), dtype=torch.uint8)
    assert torch.equal(pack4(codes), codes[::2] << 4 | codes[1::2]) and torch.equal(unpack4(pack4(codes)), codes)


@pytest.mark.parametrize("signed", [True, False])
def test_4bit_codes_and_scales_are_torchaos(signed):
    torch.manual_seed(0)
    x = torch.randn(64 * BLOCK_4BIT) * torch.logspace(-6, 0, 64).repeat_interleave(BLOCK_4BIT)
    x = x if signed else x.square()
    qmap = QuantMap.dynamic(True, bits=4) if signed else QuantMap(linear_map(4))
    codes, scales = quantize(x, qmap, BLOCK_4BIT)
    scaled, their_scales = torchao_quant.scale_tensor(x, BLOCK_4BIT)
    their_codes = torchao_quant.quantize_4bit_with_qmap(scaled, qmap.levels)
    assert torch.equal(scales, their_scales)
    assert (codes != their_codes).sum() <= 2  # ties between two levels may round the other way
    back = dequantize(codes, scales, qmap)
    assert torch.equal(back, torchao_quant.dequant_with_qmap(codes, qmap.levels, scales))


def test_a_zero1_resume_holds_the_codes_once_and_steps_as_the_straight_run(tmp_path, monkeypatch):
    """ZeRO-1 (one gloo process) over AdamW8bit, saved and loaded by the checkpoint code: the local optimizer
    holds uint8 codes, the wrapper no fp32 copy of them (torch's base load makes one), and three more steps equal
    the straight run's."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from llmstages.train.checkpoint import load_checkpoint, save_checkpoint

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29400 + torch.randint(0, 500, ()).item()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:

        def build():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Linear(512, 8))
            return model, ZeroRedundancyOptimizer(list(model.parameters()), optimizer_class=AdamW8bit, lr=1e-2)

        def steps(model, opt, ts):
            for t in ts:
                g = torch.Generator().manual_seed(t)
                loss = model(torch.randn(4, 64, generator=g)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()

        straight, opt = build()
        steps(straight, opt, range(6))
        model, opt = build()
        steps(model, opt, range(3))
        opt.consolidate_state_dict(to=0)
        path = save_checkpoint(tmp_path, 3, model, opt, {})
        model, opt = build()
        load_checkpoint(path, model, opt)
        local = [t for st in opt.optim.state.values() for k, t in st.items() if k.endswith("_codes")]
        assert len(local) == 4 and all(t.dtype == torch.uint8 for t in local)  # two weights x two moments
        assert not any(t is not None for t in opt.state.values())
        steps(model, opt, range(3, 6))
        assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), model.parameters()))
    finally:
        dist.destroy_process_group()
