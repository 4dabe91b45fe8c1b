"""QLoRA's frozen base (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): every frozen
linear weight stored in 4-bit NormalFloat, dequantized on each use in the compute dtype.

NF4 keeps one of 16 levels per weight, the levels spaced as the quantiles of a normal distribution (weights are
about normal), scaled per block of 64 weights by the block's absmax:

    w ~ NF4_LEVELS[code] * absmax(block)

Double quantization stores those absmax scales in 8 bits too: minus their mean, then linearly per group of
`scale_group` scales (factor = 256 / (2 absmax of the group), rounded and clamped to int8). A weight then costs
4 bits + 8/64 bits + 32/(64 * scale_group) bits, about 0.52 bytes instead of 4 (fp32) or 2 (bf16).

The layout follows torchao's NF4Tensor (the same scales and codes; two codes per byte, the first in the high
nibble), so `tests/peft/test_nf4.py` can compare the two. Levels not stored as exact fractions: the paper's
values, from bitsandbytes' table (torchao rounds them to four decimals).

The forward and backward products dequantize the weight again each time (`nf4_linear`): nothing of full size
is kept between them. A `LoRALinear` and `NF4Linear` hold an `NF4Weight` as their `weight`; `train/frozen.py`
puts the original weights back before a model is saved.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmstages import matmul
from llmstages.matmul import mm

NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
"""The 16 NF4 levels (QLoRA, Appendix E): 8 positive and 7 negative normal quantiles and an exact zero,
normalised to [-1, 1]."""

BLOCK = 64
"""Weights per absmax scale (the paper's block size)."""
QUANTIZE_WEIGHTS = 1 << 18
"""Weights `NF4Weight.quantize` converts at a time."""
SCALE_GROUP = 256
"""Scales per second-level factor (the paper's 256; fewer where a weight has fewer blocks or another multiple)."""


class NF4Weight(nn.Module):
    """A frozen (out, in) weight in NF4 with double-quantized scales; `dequantize(dtype)` gives it back.

    Buffers: codes (numel/2,) uint8; scales (numel/64,) int8; factors (numel/64/scale_group,) fp32; mean () fp32;
    levels (16,) fp32 (kept with the weight so that a copy dequantizes alone)."""

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype,
        block: int = BLOCK,
        scale_group: int = SCALE_GROUP,
        levels: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        numel = shape[0] * shape[1]
        if numel % block or block % 2:
            raise ValueError(f"NF4: {numel} weights are not a whole number of blocks of {block}")
        n_blocks = numel // block
        if n_blocks % scale_group:
            raise ValueError(f"NF4: {n_blocks} scales are not a whole number of groups of {scale_group}")
        self.shape, self.orig_dtype, self.block, self.scale_group = tuple(shape), dtype, block, scale_group
        self.register_buffer("codes", torch.zeros(numel // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(n_blocks, dtype=torch.int8, device=device))
        self.register_buffer("factors", torch.ones(n_blocks // scale_group, device=device))
        self.register_buffer("mean", torch.zeros((), device=device))
        lv = torch.tensor(NF4_LEVELS) if levels is None else levels.float()
        self.register_buffer("levels", lv.to(device))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weight had: what it dequantizes to by default."""
        return self.orig_dtype

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @classmethod
    @torch.no_grad()
    def quantize(
        cls, w: torch.Tensor, block: int = BLOCK, scale_group: int | None = None, levels: torch.Tensor | None = None
    ) -> NF4Weight:
        """Quantize a 2-D weight. `scale_group` defaults to the largest divisor of the number of blocks that is at
        most 256 and a power of two."""
        if w.dim() != 2:
            raise ValueError(f"NF4 quantizes 2-D weights, got shape {tuple(w.shape)}")
        numel = w.numel()
        n_blocks = numel // block if numel % block == 0 else 0
        if scale_group is None:
            scale_group = math.gcd(n_blocks, SCALE_GROUP) if n_blocks else SCALE_GROUP
        q = cls(tuple(w.shape), w.dtype, block, scale_group, levels, w.device)
        blocks = w.detach().reshape(n_blocks, block).contiguous()
        rows = max(QUANTIZE_WEIGHTS // block, 1)  # blocks at a time: the temporaries stay small and of one size
        absmax = torch.cat([blocks[i : i + rows].float().abs().amax(dim=1) for i in range(0, n_blocks, rows)])
        # second level: the scales minus their mean, linearly to int8 per group
        mean = absmax.mean()
        centred = (absmax - mean).view(-1, scale_group)
        factors = 256 / (2 * centred.abs().amax(dim=1))
        q.scales.copy_((centred * factors[:, None]).round().clamp(-128, 127).to(torch.int8).view(-1))
        q.factors.copy_(factors)
        q.mean.copy_(mean)
        # first level: each weight to its nearest level, scaled by its block's exact absmax (ties: the lower level)
        mids = (q.levels[:-1] + q.levels[1:]) / 2
        divisor = torch.where(absmax > 0, absmax, 1.0)
        codes = q.codes.view(n_blocks, block // 2)
        for i in range(0, n_blocks, rows):
            scaled = blocks[i : i + rows].float() / divisor[i : i + rows, None]
            idx = torch.bucketize(scaled, mids, out_int32=True)  # the number of midpoints below each weight
            codes[i : i + rows] = idx[:, 0::2] << 4 | idx[:, 1::2]
        return q

    def block_scales(self) -> torch.Tensor:
        """The absmax of each block as stored: int8 / factor + mean, fp32 (numel/64,)."""
        groups = self.scales.view(-1, self.scale_group).float() / self.factors[:, None]
        return groups.view(-1) + self.mean

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight: level x block scale, computed in fp32, returned in `dtype` (default: the original)."""
        pairs = torch.stack((self.levels.repeat_interleave(16), self.levels.repeat(16)), dim=1)  # byte -> 2 levels
        w = torch.index_select(pairs, 0, self.codes.int()).view(-1, self.block)  # one lookup for two weights
        w.mul_(self.block_scales()[:, None])
        return w.view(self.shape).to(dtype or self.orig_dtype)

    def extra_repr(self) -> str:
        return f"{self.shape[0]}, {self.shape[1]}, NF4 block={self.block}, scale_group={self.scale_group}"


class _NF4Product(torch.autograd.Function):
    """x W^T + b with W dequantized in the forward and again in the backward: nothing of W's size is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        ctx.weight = weight
        return matmul.linear(x, weight.dequantize(compute_dtype(x)), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        return mm(grad, ctx.weight.dequantize(grad.dtype)), None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the product runs in: autocast's, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def linear(x: torch.Tensor, weight: torch.Tensor | NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a plain weight or an NF4 one (a frozen bias: no gradient reaches it)."""
    if isinstance(weight, NF4Weight):  # on 2-D rows, so that the output is not a view (add_ may follow)
        out = _NF4Product.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], out.shape[-1])
    return matmul.linear(x, weight, bias)


def dense(weight: torch.Tensor | NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight as a tensor (NF4: dequantized), in `dtype` (default: as it is)."""
    if isinstance(weight, NF4Weight):
        return weight.dequantize(dtype)
    return weight if dtype is None else weight.to(dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is NF4 (the layers QLoRA does not adapt). `weight` may be put back as a
    plain parameter (before saving), and the layer keeps working."""

    def __init__(self, weight: NF4Weight, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"
