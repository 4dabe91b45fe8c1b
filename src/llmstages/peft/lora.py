"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024) as a drop-in replacement for `nn.Linear`.

LoRA:  y = x W^T + b + s * B A x,   A (r, in) Kaiming-uniform, B (out, r) zeros, s = alpha / r
       (or alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023). At init B = 0, so the module equals the base.
DoRA:  W' = m * (W + s B A) / ||W + s B A||_row,  m (out,) initialised to ||W||_row, so again equal at init.
       The row norm is treated as a constant in the backward pass, as the DoRA paper proposes (section 4.3).

The frozen base keeps the names `weight` and `bias`, so a model's state-dict keys do not change when LoRA is
applied: only `lora_A.weight`, `lora_B.weight` (and `lora_magnitude_vector`) are added. Under QLoRA `weight` is
an `NF4Weight` (peft/nf4.py), dequantized in each product.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmstages.matmul import mm
from llmstages.peft.nf4 import NF4Linear, NF4Weight, compute_dtype, dense, linear


def _lora_product(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T + b + (s x A^T) B^T, s x A^T) for rows x (N, in), all in one dtype."""
    xa = mm(x, a.t()).mul_(scaling)  # (N, r)
    return linear(x, w, bias).addmm_(xa, b.t()), xa


class _LoRAProduct(torch.autograd.Function):
    """y = x W^T + b + (s x A^T) B^T for rows x (N, in), with the adapter's product accumulated into the base's
    output by addmm_ (and in the backward, dx = dy W + (s dy B) A likewise): no full-size adapter output and no
    separate full-size sum, which on a CPU cost about as much as the rank-r products' FLOPs suggest they should not
    (benchmarks/finetune_vs_hf.py). W (a tensor or an NF4Weight, dequantized again in the backward) and b are
    frozen; every input is already in the compute dtype. Backward:
        g = s dy B (N, r);  dA = g^T x;  dB = dy^T (s x A^T);  dx = dy W + g A."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling):  # noqa: ANN001, ANN205
        w = dense(weight, x.dtype)
        out, xa = _lora_product(x, w, bias, a, b, scaling)
        nf4 = isinstance(weight, NF4Weight)  # dequantized again in the backward: nothing W-sized saved
        ctx.scaling, ctx.weight = scaling, weight if nf4 else None
        ctx.save_for_backward(x, None if nf4 else w, a, b, xa)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, w, a, b, xa = ctx.saved_tensors
        g = mm(grad, b).mul_(ctx.scaling)  # s dy B: the gradient of x A^T, (N, r)
        dx = da = db = None
        if ctx.needs_input_grad[4]:
            db = mm(grad.t(), xa)
        if ctx.needs_input_grad[3]:
            da = mm(g.t(), x)
        if ctx.needs_input_grad[0]:
            w = dense(ctx.weight, grad.dtype) if w is None else w
            dx = mm(grad, w).addmm_(g, a)
        return dx, None, None, da, db, None


class LoRALinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.use_rslora, self.use_dora = rank, alpha, use_rslora, use_dora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features))
        self.merged = False
        self.disabled = False
        self.sampling_weight: torch.Tensor | None = None  # set by `peft.merged_for_sampling`, never saved
        self.sampling_casts: dict[torch.dtype, tuple] | None = None  # set while `generate` runs (casts_once)
        self.reset_lora()

    @classmethod
    def from_linear(cls, linear: nn.Linear | NF4Linear, **kw) -> LoRALinear:
        """Wrap an existing layer: its weight and bias become the frozen base (shared, not copied; an NF4 weight
        stays NF4)."""
        with torch.device("meta"):
            m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kw)
        if isinstance(linear.weight, NF4Weight):
            del m.weight
        m.weight = linear.weight
        m.weight.requires_grad_(False)
        if linear.bias is not None:
            m.bias = linear.bias
            m.bias.requires_grad_(False)
        dev, dtype = linear.weight.device, linear.weight.dtype
        m.lora_A.to_empty(device=dev)
        m.lora_B.to_empty(device=dev)
        m.lora_A.to(dtype)
        m.lora_B.to(dtype)
        if m.use_dora:
            m.lora_magnitude_vector = nn.Parameter(torch.empty(m.out_features, device=dev, dtype=dtype))
        m.reset_lora()
        return m

    def reset_lora(self) -> None:
        if self.lora_A.weight.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(dense(self.weight).norm(p=2, dim=1))

    def delta_weight(self) -> torch.Tensor:
        """s * B A, shape (out, in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _dora_scale(self) -> torch.Tensor:
        """m / ||W + s B A||_row, the norm detached (no gradient through it). Shape (out,)."""
        norm = (dense(self.weight, torch.float32) + self.delta_weight().float()).norm(p=2, dim=1).detach()
        return self.lora_magnitude_vector / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype and x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            # The frozen base is held in bf16/fp16 (train/frozen.py) and the caller runs without autocast: compute
            # as autocast would, in the base's dtype.
            with torch.autocast(x.device.type, dtype=self.weight.dtype):
                return self.forward(x)
        if self.disabled or self.merged:
            return linear(x, self.weight, self.bias)
        if self.sampling_weight is not None:
            return linear(x, self.sampling_weight, self.bias)
        if self._fusable():
            dt = compute_dtype(x)
            a, b, bias = self._in_dtype(dt)
            rows = x.reshape(-1, self.in_features).to(dt)
            if torch.is_grad_enabled():
                out = _LoRAProduct.apply(rows, self.weight, bias, a, b, self.scaling)
            else:  # sampling, scoring: the same product without an autograd node per layer
                out = _lora_product(rows, dense(self.weight, dt), bias, a, b, self.scaling)[0]
            return out.view(*x.shape[:-1], self.out_features)
        lora = self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)  # scale the rank-r tensor: cheaper
        if not self.use_dora:
            # In place on the base output (its backward does not need it): no extra full-size activations.
            return linear(x, self.weight, self.bias).add_(lora)
        out = self._dora_scale() * (linear(x, self.weight) + lora)
        return out if self.bias is None else out + self.bias

    def _in_dtype(self, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A, B and the bias in `dt`. While sampling (`sampling_casts` set, no grad) cast once for the whole call:
        in bf16 the per-step casts of every layer's A and B cost about a sixth of a rank-16 layer's time."""
        cache = self.sampling_casts if not torch.is_grad_enabled() else None
        if cache is not None and dt in cache:
            return cache[dt]
        cast = (self.lora_A.weight.to(dt), self.lora_B.weight.to(dt), None if self.bias is None else self.bias.to(dt))
        if cache is not None:
            cache[dt] = cast
        return cast

    def _fusable(self) -> bool:
        """Whether `_LoRAProduct` computes this layer: LoRA (not DoRA), no dropout in use, frozen base, plain or NF4
        weight (not a sharded DTensor)."""
        frozen = not getattr(self.weight, "requires_grad", False) and (self.bias is None or not self.bias.requires_grad)
        no_dropout = isinstance(self.lora_dropout, nn.Identity) or not self.training
        return not self.use_dora and frozen and no_dropout and not hasattr(self.weight, "device_mesh")

    def effective_weight(self) -> torch.Tensor | None:
        """The one matrix this layer multiplies by, with the adapter's gradient through it: W + s B A (DoRA:
        m / ||W + s B A||_row * (W + s B A), the norm detached as in `forward`), in fp32; None where no single matrix
        is the layer (dropout on the adapter's input while training, a bias). The fused losses use it for a head."""
        if self.disabled or self.merged:
            return dense(self.weight) if self.bias is None else None
        if self.bias is not None or (self.training and isinstance(self.lora_dropout, nn.Dropout)):
            return None
        w = dense(self.weight, torch.float32) + self.delta_weight().float()
        return self._dora_scale().float()[:, None] * w if self.use_dora else w

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + s B A (DoRA: m / ||W + s B A||_row * (W + s B A)) as a new tensor in the base's dtype, summed in fp32;
        `weight` and the adapter are not touched."""
        w = dense(self.weight, torch.float32) + self.delta_weight().float()
        if self.use_dora:
            w = self._dora_scale().float()[:, None] * w
        return w.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `weight` (inference is then a plain linear layer)."""
        if self.merged:
            return
        if not isinstance(self.weight, torch.Tensor):
            raise RuntimeError("merge: the base weight is NF4; put the original weights back first (train/frozen.py)")
        delta = self.delta_weight().to(self.weight.dtype)
        if self.use_dora:
            self._merge_scale = self._dora_scale().to(self.weight.dtype)
            self.weight.copy_(self._merge_scale[:, None] * (self.weight + delta))
        else:
            self.weight.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge()`, restoring the base weight (up to rounding)."""
        if not self.merged:
            return
        delta = self.delta_weight().to(self.weight.dtype)
        if self.use_dora:
            self.weight.copy_(self.weight / self._merge_scale[:, None] - delta)
        else:
            self.weight.sub_(delta)
        self.merged = False

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        return f"{self.in_features}, {self.out_features}, {kind} rank={self.rank}, alpha={self.alpha}"
