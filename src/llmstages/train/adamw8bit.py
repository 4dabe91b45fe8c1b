"""AdamW with its two moments held in 8 bits (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"; `train.optimizer: adamw8bit`) or in 4 bits (Li et al. 2023, "Memory Efficient Optimizers with
4-bit States"; `train.optimizer: adamw4bit`).

Each moment is cut into blocks; a block is divided by its absmax and each value stored as the index of the
nearest level of a quantization map. 8 bits: blocks of 256 values, the 256 levels of the dynamic map (below),
signed for the first moment m, unsigned for the second v; a parameter's state costs 2 x (1 + 4/256) bytes
instead of AdamW's 8. 4 bits: blocks of 128, m on the 16-level signed dynamic map, v on the linear map 1/16,
2/16, ..., 1 (no zero: a v rounded to 0 would divide the update by eps alone), two codes a byte; 2 x (1/2 +
4/128) bytes. The maps and block sizes are bitsandbytes' and torchao's. A tensor of fewer than 4096 values, or
not a whole number of blocks, keeps fp32 moments (as those libraries do).

A step, per parameter, in fp32 (the update uses the moments before they are rounded back to low bits):

    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Large tensors go through in chunks, so the fp32 working copies stay small next to the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

BLOCK = 256
"""Values per absmax scale (8 bits; 4 bits: BLOCK_4BIT)."""
BLOCK_4BIT = 128
MIN_SIZE = 4096
"""Tensors with fewer values keep fp32 moments."""
_CHUNK = BLOCK << 14  # 4M values (16 MB in fp32) a pass


def dynamic_map(signed: bool, bits: int = 8) -> torch.Tensor:
    """The 2^bits levels of the dynamic (tree) quantization map of Dettmers (2016), as bitsandbytes and torchao
    build it: with e = bits - 1 decades 10^-(e-1) .. 10^0, for decade i = 0..e-1 the midpoints of an even split of
    [0.1, 1] into 2^i (signed: and their negatives) or 2^(i+1) parts, scaled by the decade; plus 0 and 1.
    Sorted, shape (2^bits,)."""
    levels = [0.0, 1.0]
    e = bits - 1
    for i in range(e):
        parts = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, parts + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10 ** (i - (e - 1))).tolist()
        levels += mids + ([-x for x in mids] if signed else [])
    return torch.tensor(sorted(levels), dtype=torch.float32)


def linear_map(bits: int = 4) -> torch.Tensor:
    """1/2^bits, 2/2^bits, ..., 1: the 4-bit second moment's levels (Li et al. 2023: no zero)."""
    return torch.linspace(0, 1, 2**bits + 1, dtype=torch.float32)[1:]


_SHIFT = 15  # a value's top 17 bits (sign, exponent, 8 mantissa bits) pick its row of the code table


class QuantMap:
    """A map's levels and what finds the nearest one fast: the code table of every 17-bit prefix of an fp32
    value (the code of the prefix's lowest value; a prefix spans under 0.4%, less than any two levels' gap, so at
    most one midpoint falls inside it) and the midpoints (a value at or above the next one goes one code up).
    `quantize` is then two lookups and a comparison, where a binary search over 255 midpoints took three times
    as long on a CPU."""

    def __init__(self, levels: torch.Tensor) -> None:
        self.levels = levels
        mids = (levels[:-1] + levels[1:]) / 2
        keys = torch.arange(1 << (32 - _SHIFT), dtype=torch.int64)
        low = torch.where(
            keys >= 1 << (31 - _SHIFT), keys << _SHIFT | (1 << _SHIFT) - 1, keys << _SHIFT
        )  # -: most negative
        lowest = ((low + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32).view(torch.float32)
        self.table = torch.bucketize(lowest, mids, right=True).to(torch.int32).to(levels.device)
        self.bounds = torch.cat((mids, mids.new_full((1,), float("inf"))))

    @classmethod
    def dynamic(cls, signed: bool, device: torch.device | str = "cpu", bits: int = 8) -> QuantMap:
        return cls(dynamic_map(signed, bits).to(device))


def quantize(x: torch.Tensor, qmap: QuantMap, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (n,) uint8, scales (n / block,) fp32) of a flat fp32 tensor: each value / its block's absmax, to
    the nearest level (a tie goes up)."""
    blocks = x.view(-1, block)
    scales = blocks.abs().amax(dim=1).clamp_min(1e-12)
    y = (blocks / scales[:, None]).view(-1)
    code = torch.index_select(qmap.table, 0, (y.view(torch.int32) >> _SHIFT) & (1 << (32 - _SHIFT)) - 1)
    code += y >= torch.index_select(qmap.bounds, 0, code)
    return code.to(torch.uint8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, qmap: QuantMap) -> torch.Tensor:
    """levels[codes] x the block's scale, flat fp32."""
    values = torch.index_select(qmap.levels, 0, codes.int()).view(scales.numel(), -1)
    return values.mul_(scales[:, None]).view(-1)


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes a byte, the first in the high half: (n,) -> (n / 2,) uint8."""
    pairs = codes.view(-1, 2)
    return pairs[:, 0] << 4 | pairs[:, 1]


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    """`pack4` undone: (n / 2,) -> (n,) uint8."""
    return torch.stack((packed >> 4, packed & 15), dim=1).view(-1)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW over block-wise 8-bit moments. State per parameter: `step`, and either `exp_avg`/`exp_avg_sq` (fp32,
    small tensors) or `exp_avg_codes`, `exp_avg_scales`, `exp_avg_sq_codes`, `exp_avg_sq_scales`: plain tensors,
    so a checkpoint saves and resumes them as they are."""

    bits, block = 8, BLOCK

    @classmethod
    def state_bytes(cls) -> float:
        """Bytes of state a quantized value costs: two moments, each a code and a share of its block's scale."""
        return 2 * (cls.bits / 8 + 4 / cls.block)

    @staticmethod
    def pack(codes: torch.Tensor) -> torch.Tensor:
        """Codes (n,) as stored: one a byte here."""
        return codes

    @staticmethod
    def unpack(stored: torch.Tensor) -> torch.Tensor:
        return stored

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._maps: dict[tuple[bool, torch.device], QuantMap] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading casts every state tensor of a float parameter to its dtype: the codes go back to uint8
        (exact: integers below 256), or a resumed run would hold them in 4 bytes each."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key, value in state.items():
                if key.endswith("_codes"):
                    state[key] = value.to(torch.uint8)

    def qmap(self, signed: bool, device: torch.device) -> QuantMap:
        if (signed, device) not in self._maps:
            self._maps[signed, device] = self.make_map(signed, device)
        return self._maps[signed, device]

    def make_map(self, signed: bool, device: torch.device) -> QuantMap:
        """The first moment's map (signed) or the second's."""
        return QuantMap.dynamic(signed, device)

    def quantized(self, p: torch.Tensor) -> bool:
        return p.numel() >= MIN_SIZE and p.numel() % self.block == 0

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = {"step": torch.tensor(0.0)}
        for name in ("exp_avg", "exp_avg_sq"):
            if self.quantized(p):
                levels = self.qmap(name == "exp_avg", p.device).levels
                zero = levels.abs().argmin()  # the code of 0.0 with scales 1; a map without 0: any code, scales 0
                codes = torch.full((p.numel(),), int(zero), dtype=torch.uint8, device=p.device)
                state[f"{name}_codes"] = self.pack(codes)
                fill = 1.0 if levels[zero] == 0 else 0.0
                n_blocks = p.numel() // self.block
                state[f"{name}_scales"] = torch.full((n_blocks,), fill, dtype=torch.float32, device=p.device)
            else:
                state[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state

    def _moment(self, state: dict[str, torch.Tensor], name: str, lo: int, hi: int, device: torch.device):
        """Values lo:hi of a moment in fp32: a view of the fp32 state, or dequantized."""
        if name in state:
            return state[name].view(-1)[lo:hi]
        codes = self.unpack(state[f"{name}_codes"][lo * self.bits // 8 : hi * self.bits // 8])
        scales = state[f"{name}_scales"][lo // self.block : hi // self.block]
        return dequantize(codes, scales, self.qmap(name == "exp_avg", device))

    def _store(self, state: dict[str, torch.Tensor], name: str, lo: int, hi: int, x: torch.Tensor) -> None:
        if name in state:
            return  # `x` is a view of the state: already updated in place
        codes, scales = quantize(x, self.qmap(name == "exp_avg", x.device), self.block)
        state[f"{name}_codes"][lo * self.bits // 8 : hi * self.bits // 8] = self.pack(codes)
        state[f"{name}_scales"][lo // self.block : hi // self.block] = scales

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1
                t = float(state["step"])
                step_size, root2 = lr / (1 - b1**t), math.sqrt(1 - b2**t)
                flat, grad = p.view(-1), p.grad.reshape(-1)
                for lo in range(0, p.numel(), _CHUNK):
                    hi = min(lo + _CHUNK, p.numel())
                    w, g = flat[lo:hi].float(), grad[lo:hi].float()
                    m = self._moment(state, "exp_avg", lo, hi, p.device).lerp_(g, 1 - b1)
                    v = self._moment(state, "exp_avg_sq", lo, hi, p.device).lerp_(g.square(), 1 - b2)
                    w.mul_(1 - lr * wd).addcdiv_(m, v.sqrt().div_(root2).add_(eps), value=-step_size)
                    flat[lo:hi].copy_(w)
                    self._store(state, "exp_avg", lo, hi, m)
                    self._store(state, "exp_avg_sq", lo, hi, v)
        return loss


class AdamW4bit(AdamW8bit):
    """AdamW over block-wise 4-bit moments (see the module docstring): the first on the 16-level signed dynamic
    map, the second on the linear map without zero, blocks of 128, two codes a byte. The same state keys as
    AdamW8bit's, with `*_codes` packed (`pack4`)."""

    bits, block = 4, BLOCK_4BIT
    pack, unpack = staticmethod(pack4), staticmethod(unpack4)

    def make_map(self, signed: bool, device: torch.device) -> QuantMap:
        return QuantMap.dynamic(True, device, bits=4) if signed else QuantMap(linear_map(4).to(device))


LOW_BIT = {"adamw8bit": AdamW8bit, "adamw4bit": AdamW4bit}
"""train.optimizer's quantized choices."""
