"""Batched autoregressive generation with a KV cache applied from outside the model.

Prompts of different lengths are left-padded so that every row's next token sits in the same column; the
padding is masked out of attention and skipped by the position ids. Each step feeds only the new token and
reads past keys/values from a preallocated `KVCache`. Sampling: greedy, temperature, top-k, top-p (nucleus,
Holtzman et al. 2019). Each row stops at its own end-of-sequence token. Rows with the same prompt (GRPO's group of
replies to one prompt) share its prefill: the prompt's keys and values are computed once and copied to each row.
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from llmstages.errors import UserError
from llmstages.matmul import Linear

if TYPE_CHECKING:
    from llmstages.data.tokenizer import Tokenizer
    from llmstages.model.gpt import GPT


def cache_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a cache keeps keys or values like `t` in: on a CPU, half precision is kept in fp32, the dtype
    attention reads it in there (`gpt.attention`), so that a decode step does not cast the whole cache again; the
    values are the same (a bf16/fp16 number is exact in fp32). Elsewhere `t`'s own dtype."""
    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return t.dtype


class KVCache:
    """Preallocated keys and values for every layer: (n_layers, B, n_kv_heads, max_len, head_dim).

    The model calls `update(layer, k, v)` in each attention layer and `advance(T)` once after the forward.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.n_layers, self.max_len = n_layers, max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = k.shape
        if self.k is None:  # allocated on first use, in the dtype attention reads (autocast included)
            dt = cache_dtype(k)
            self.k = k.new_empty(self.n_layers, B, H, self.max_len, D, dtype=dt)
            self.v = v.new_empty(self.n_layers, B, H, self.max_len, D, dtype=dt)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def expand(self, rows: torch.Tensor) -> None:
        """Row b of the cache becomes the old row rows[b]: the prompt prefilled once serves each of its replies."""
        if self.k is not None and self.v is not None:
            self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)


class StaticKVCache:
    """Keys and values of a fixed batch and length, each row written at its own columns `at` (B, T): its shapes
    never change while a batch decodes, so a compiled decode step is traced once, and rows at different lengths
    (continuous batching) share it. Attention reads the whole buffer and the mask hides what is not written yet;
    `pos` stays 0 and `advance` does nothing (the positions travel as tensors: `at` here, the position ids and the
    mask in the model's call)."""

    pos = 0

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.n_layers, self.max_len = n_layers, max_len
        self.k: list[torch.Tensor] = []  # one (B, n_kv_heads, max_len, head_dim) buffer a layer
        self.v: list[torch.Tensor] = []
        self.at: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.k:  # zeros: unwritten keys are masked, but must not be NaN
            B, H, _, D = k.shape
            self.k = [k.new_zeros(B, H, self.max_len, D, dtype=cache_dtype(k)) for _ in range(self.n_layers)]
            self.v = [v.new_zeros(B, H, self.max_len, D, dtype=cache_dtype(v)) for _ in range(self.n_layers)]
        assert self.at is not None
        where = self.at[:, None, :, None].expand(-1, k.size(1), -1, k.size(3))  # (B, H, T, D)
        self.k[layer].scatter_(2, where, k.to(self.k[layer].dtype))
        self.v[layer].scatter_(2, where, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        pass

    def expand(self, rows: torch.Tensor) -> None:
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]


def _static_forward(
    model: GPT, cache: StaticKVCache, ids: torch.Tensor, at: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Next-token logits (B, V) of the last of `ids` (B, T), written into `cache` at the columns `at` (B, T);
    `positions` (B, T) are the tokens' position ids, `mask` (B, 1, T, M) what each may attend to."""
    cache.at = at
    return model.lm_head(model.hidden_states(ids, mask=mask, position_ids=positions, cache=cache)[:, -1])


_compiled_forward: Callable | None = None


def compiled_forward() -> Callable:
    """`_static_forward` compiled once for the process (torch.compile traces it again for a new model or
    shape); eager when torch cannot compile here (no C++ compiler on a CPU)."""
    global _compiled_forward
    if _compiled_forward is None:
        _compiled_forward = torch.compile(_static_forward, dynamic=False) if can_compile() else _static_forward
    return _compiled_forward


def can_compile() -> bool:
    """Whether torch.compile can build kernels here: a GPU (triton), or on a CPU the compiler inductor uses."""
    return torch.cuda.is_available() or cpu_compiler() is not None


def cpu_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) builds its kernels with, found on the PATH, or None.
    The names are inductor's own setting (`cpp.cxx`: $CXX, else g++; clang++ on macOS)."""
    from torch._inductor import config

    for name in config.cpp.cxx:
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


@dataclass
class Generation:
    """Result of `generate`.

    tokens: (B, N) new tokens; after a row's EOS (which is kept) the rest is `pad_id`.
    logprobs: (B, N) log-probability of each new token under the sampling distribution before top-k/top-p
        filtering, i.e. log_softmax(logits / temperature) (temperature 1 for greedy); 0 after the end.
    mask: (B, N) 1 for generated tokens (EOS included), 0 after the end.
    lengths: (B,) number of generated tokens per row.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Token lists -> (ids (B, P), mask (B, P)), right-aligned: padding on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, P - len(p) :] = 1
    return ids.to(device), mask.to(device)


def check_temperature(t: float, name: str) -> None:
    """A sampling temperature: finite and >= 0 (0 is greedy); `name` is the key or flag it came from."""
    if not math.isfinite(t):
        raise UserError(f"{name} must be a finite number >= 0 (0 is greedy), got {t}")
    if t < 0:
        raise UserError(f"{name} must be >= 0 (0 is greedy), got {t}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from logits (B, V). Returns (token (B,), its log-prob (B,) before filtering)."""
    logits = logits.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, -1)
    filt = logits
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(filt, top_k, dim=-1).values[:, -1:]
        filt = filt.masked_fill(filt < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(filt, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filt = torch.full_like(filt, float("-inf")).scatter(-1, order, sorted_logits)
    tok = draw(logp.exp() if filt is logits else torch.softmax(filt, -1), generator)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (B, V) (non-negative, each row summing to about 1), by the inverse of its
    cumulative distribution: the first v with cumsum(p)_v > u for one uniform u in [0, sum p) per row. One random
    number a row, where torch.multinomial draws one exponential per vocabulary entry (a row of 49,152 costs about
    1 ms on a CPU core). A token of probability 0 is never drawn (the sum does not rise at it)."""
    cum = probs.cumsum(-1)
    total = cum[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cum.dtype) * total
    tok = torch.searchsorted(cum, u, right=True).squeeze(-1)
    over = tok >= probs.size(-1)  # u rounded up to the total: the last token that has probability
    return torch.where(over, cum.argmax(-1), tok) if bool(over.any()) else tok


def _casts_once(fn: Callable) -> Callable:
    """Run `fn(model, ...)` with what the decode steps would cast again at every step cast once for the call: a
    frozen fp32 output head in the autocast dtype (`head_in_compute_dtype`), and each LoRA layer's A, B and bias
    in the compute dtype (`LoRALinear.sampling_casts`). Same values, same tokens."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args, **kw):
        loras = [m for m in model.modules() if hasattr(m, "sampling_casts")]
        for m in loras:
            m.sampling_casts = {}
        try:
            with head_in_compute_dtype(model):
                return fn(model, *args, **kw)
        finally:
            for m in loras:
                m.sampling_casts = None

    return wrapper


@contextlib.contextmanager
def head_in_compute_dtype(model: nn.Module) -> Iterator[None]:
    """Under bf16/fp16 autocast, every decode step's product casts an fp32 output head (V x d, 113 MB at
    SmolLM2's vocabulary) to the autocast dtype again when it is frozen (a LoRA policy's, a reference's: autocast
    keeps casts only of weights that require grad). Here it is cast once for the block, to the same values, and
    the original put back on exit (the tie to the embedding with it)."""
    head = getattr(model, "lm_head", None)
    w = head.weight if type(head) in (nn.Linear, Linear) else None
    device = w.device.type if w is not None else "cpu"
    if (
        w is None
        or w.requires_grad
        or w.dtype != torch.float32
        or hasattr(w, "placements")  # an FSDP/TP shard: gathered per use
        or not torch.is_autocast_enabled(device)
    ):
        yield
        return
    head.weight = nn.Parameter(w.detach().to(torch.get_autocast_dtype(device)), requires_grad=False)
    try:
        yield
    finally:
        head.weight = w


@torch.no_grad()
@_casts_once
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    *,
    prompt_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
    share_prompts: bool = True,
    compile: bool = False,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> Generation:
    """Continue each prompt by up to `max_new_tokens` tokens.

    prompts: token lists (left-padded here) or a left-padded (B, P) tensor with its `prompt_mask`.
    temperature 0 is greedy. `eos_id` (one id or several) ends a row; None generates `max_new_tokens` always.
    `use_cache=False` recomputes the whole sequence each step (the slow reference the cache must match).
    `share_prompts`: rows with the same prompt and padding are prefilled once (with the cache).
    `compile`: decode over a `StaticKVCache` with the step compiled by torch.compile (eager where it cannot).
    `on_token(tokens)` is called with each step's (B,) new tokens as they are drawn (streaming output).
    """
    device = next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        ids = prompts.to(device)
        mask = torch.ones_like(ids) if prompt_mask is None else prompt_mask.to(device).long()
    else:
        ids, mask = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    context = model.config.block_size
    if P + max_new_tokens > context:
        raise UserError(
            f"prompt of {P} tokens plus {max_new_tokens} new tokens exceeds the model's context of {context} "
            f"tokens; shorten the prompt or lower max_new_tokens to {max(context - P, 0)}"
        )
    eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id or []), device=device)
    was_training = model.training
    model.eval()
    out_tok = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((B, max_new_tokens), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    shared = _distinct_rows(ids, mask) if use_cache and share_prompts else None
    if use_cache and compile and model.config.sliding_window is None:
        step_logits = _static_logits(model, ids, mask, max_new_tokens, shared)
    else:
        step_logits = _eager_logits(model, ids, mask, max_new_tokens, use_cache, shared)
    n, tok = 0, None
    for n in range(max_new_tokens):
        logits = step_logits.send(tok)  # the first send (None) starts it: the prefill
        tok, lp = sample_next(logits, temperature, top_k, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out_tok[:, n] = tok
        out_lp[:, n] = torch.where(done, torch.zeros_like(lp), lp)
        if on_token is not None:
            on_token(tok)
        if eos.numel():
            done = done | torch.isin(tok, eos)
        if bool(done.all()):
            break
    step_logits.close()
    model.train(was_training)
    steps = n + 1 if max_new_tokens else 0
    tokens, logprobs = out_tok[:, :steps], out_lp[:, :steps]
    gen = _generated_mask(tokens, eos) if steps else tokens.new_zeros((B, 0))
    return Generation(tokens, logprobs * gen, gen, gen.sum(-1))


Steps = Generator[torch.Tensor, torch.Tensor, None]


def _eager_logits(
    model: GPT,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    use_cache: bool,
    shared: tuple[torch.Tensor, torch.Tensor] | None,
) -> Steps:
    """The logits (B, V) of each step, given (`send`) the tokens the step before drew: the prefill, then one
    token at a time over a growing `KVCache` (or, without a cache, the whole sequence again)."""
    B, P = ids.shape
    cache = KVCache(model.config.n_layers, P + max_new_tokens) if use_cache else None
    no_pad = bool(mask.all())
    if shared is not None:  # the prefill: each distinct prompt once, then copied to its rows
        first, rows = shared
        hidden = model.hidden_states(ids[first], mask=None if no_pad else mask[first], cache=cache)
        logits = model.lm_head(hidden[:, -1]).index_select(0, rows)
        assert cache is not None
        cache.expand(rows)
    else:
        logits = model.lm_head(model.hidden_states(ids, mask=None if no_pad else mask, cache=cache)[:, -1])
    seq = ids
    while True:
        tok = yield logits  # only the last position predicts the next token
        mask = torch.cat([mask, torch.ones_like(tok[:, None])], dim=1)
        seq = torch.cat([seq, tok[:, None]], dim=1)
        step_input = tok[:, None] if use_cache else seq
        hidden = model.hidden_states(step_input, mask=None if no_pad else mask, cache=cache)
        logits = model.lm_head(hidden[:, -1])


def _static_logits(
    model: GPT,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    shared: tuple[torch.Tensor, torch.Tensor] | None,
    bucket: int = 64,
) -> Steps:
    """`_eager_logits` over a `StaticKVCache` whose length is rounded up to `bucket` (so that a few shapes
    serve every prompt length), the decode steps compiled (`compiled_forward`). The prefill runs eager."""
    B, P = ids.shape
    M = _bucket(P + max_new_tokens, bucket)
    logits, cache, keys = _prefill(model, ids, mask, M, shared)
    step = compiled_forward()
    cols = torch.arange(M, device=ids.device)
    n_real = mask.long().sum(-1, keepdim=True)  # (B, 1): the position id of the first new token
    for n in range(max_new_tokens - 1):
        tok = yield logits
        c = P + n  # the column of the token drawn at step n
        keys[:, c] = True
        at = torch.full((B, 1), c, dtype=torch.long, device=ids.device)
        logits = step(model, cache, tok[:, None], at, n_real + n, (keys & (cols <= c))[:, None, None, :])
    yield logits


def _bucket(n: int, bucket: int = 64) -> int:
    return -(-n // bucket) * bucket


def _prefill(
    model: GPT, ids: torch.Tensor, mask: torch.Tensor, M: int, shared: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, StaticKVCache, torch.Tensor]:
    """The left-padded prompts `ids` (B, P) run eager into a new `StaticKVCache` of M columns (each distinct
    prompt once when `shared`): (next-token logits (B, V), the cache, keys (B, M): the columns holding a token)."""
    B, P = ids.shape
    cache = StaticKVCache(model.config.n_layers, M)
    cols = torch.arange(M, device=ids.device)
    keys = torch.zeros(B, M, dtype=torch.bool, device=ids.device)
    keys[:, :P] = mask.bool()
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    # query column q sees the real keys up to q (a padding query sees itself: its output is unused)
    causal = cols[None, :P, None] >= cols[None, None, :]  # (1, P, M)
    own = cols[None, :P, None] == cols[None, None, :]
    rows = slice(None) if shared is None else shared[0]
    prefill_mask = ((causal & keys[rows][:, None, :]) | own)[:, None]  # (b, 1, P, M)
    at = cols[:P].expand(prefill_mask.size(0), P)
    logits = _static_forward(model, cache, ids[rows], at, positions[rows], prefill_mask)
    if shared is not None:
        logits = logits.index_select(0, shared[1])
        cache.expand(shared[1])
    return logits, cache, keys


@torch.no_grad()
@_casts_once
def generate_queue(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    slots: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    compile: bool = False,
    generator: torch.Generator | None = None,
) -> Generation:
    """`generate` for any number of prompts with continuous batching: `slots` rows decode together and a row
    whose reply ends (EOS or `max_new_tokens`) takes the next waiting prompt at once, so that one long reply does
    not hold a batch of finished ones. The waiting prompts are prefilled together (identical ones once) and their
    keys and values written into the freed rows of one `StaticKVCache`; every row decodes at its own column and
    position. Once no prompt waits, finished rows leave the batch (eager only: a compiled step keeps its shape).
    The result is in the order of `prompts`; greedy replies equal `generate`'s (tests). Sampled replies draw
    from the same distributions, in another order of the generator's draws."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    device = next(model.parameters()).device
    context, N = model.config.block_size, len(prompts)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > context:
        raise UserError(
            f"prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's context of {context} "
            f"tokens; shorten the prompt or lower max_new_tokens to {max(context - longest, 0)}"
        )
    if model.config.sliding_window is not None:  # the static cache has no window: the plain batches
        return _in_batches(model, prompts, max_new_tokens, slots, temperature, top_k, top_p, eos_id, pad_id, generator)
    eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id or []), device=device)
    S, M = min(slots, N), _bucket(longest + max_new_tokens)
    compiled = compile and can_compile()
    step = compiled_forward() if compiled else _static_forward
    was_training = model.training
    model.eval()
    out_tok = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((N, max_new_tokens), device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    cols = torch.arange(M, device=device)
    row_of = torch.full((S,), -1, dtype=torch.long, device=device)  # the prompt each slot serves (-1: none)
    col = torch.zeros(S, dtype=torch.long, device=device)  # the column its next token is written at
    pos = torch.zeros(S, dtype=torch.long, device=device)  # that token's position id
    count = torch.zeros(S, dtype=torch.long, device=device)  # tokens drawn so far
    keys = torch.zeros(S, M, dtype=torch.bool, device=device)
    cache = StaticKVCache(model.config.n_layers, M)
    logits: torch.Tensor | None = None
    waiting = iter(range(N))

    def refill(free: list[int]) -> None:
        """The next waiting prompts prefilled into the rows `free`."""
        nonlocal logits
        take = [i for _, i in zip(free, waiting)]
        free = free[: len(take)]
        if not take:
            return
        ids, mask = left_pad([prompts[i] for i in take], pad_id, device)
        P = ids.size(1)
        first, small, small_keys = _prefill(model, ids, mask, P, _distinct_rows(ids, mask))
        at = torch.tensor(free, device=device)
        if not cache.k:  # the batch's cache, in the dtype the prefill produced
            cache.k = [t.new_zeros(S, t.size(1), M, t.size(3)) for t in small.k]
            cache.v = [t.new_zeros(S, t.size(1), M, t.size(3)) for t in small.v]
            logits = first.new_zeros(S, first.size(-1))
        for layer in range(len(cache.k)):
            cache.k[layer][at, :, :P] = small.k[layer]
            cache.v[layer][at, :, :P] = small.v[layer]
        assert logits is not None
        logits[at] = first.to(logits.dtype)
        keys[at] = False
        keys[at, :P] = small_keys
        row_of[at] = torch.tensor(take, device=device)
        col[at], pos[at], count[at] = P, mask.sum(-1), 0

    refill(list(range(S)))
    while True:
        assert logits is not None
        tok, lp = sample_next(logits, temperature, top_k, top_p, generator)
        live = row_of >= 0
        rows = row_of[live]
        out_tok[rows, count[live]] = tok[live]
        out_lp[rows, count[live]] = lp[live]
        count += live.long()
        lengths[rows] = count[live]
        ended = live & ((count >= max_new_tokens) | torch.isin(tok, eos))
        row_of[ended] = -1
        # the rows still replying take their token; the others compute on, unused (their columns are masked),
        # at a column and position clamped inside the cache and the context
        c, p = col.clamp(max=M - 1), pos.clamp(max=context - 1)
        keys[torch.arange(S, device=device), c] = True
        mask = (keys & (cols[None] <= c[:, None]))[:, None, None, :]
        if bool((row_of >= 0).any()):
            logits = step(model, cache, tok[:, None], c[:, None], p[:, None], mask)
        col, pos = col + 1, pos + 1
        free = ended.nonzero().squeeze(-1).tolist()
        if free:
            refill(free)
        live = row_of >= 0
        if not bool(live.any()):
            break
        if not compiled and 2 * int(live.sum()) <= S:  # nothing waits (or it would have filled them): shrink
            keep = live.nonzero().squeeze(-1)
            cache.expand(keep)
            logits, keys, row_of, col, pos, count = (t[keep] for t in (logits, keys, row_of, col, pos, count))
            S = keep.numel()
    model.train(was_training)
    steps = int(lengths.max()) if N else 0
    tokens, logprobs = out_tok[:, :steps], out_lp[:, :steps]
    gen = (torch.arange(steps, device=device)[None] < lengths[:, None]).long()
    return Generation(tokens, logprobs * gen, gen, lengths)


def _in_batches(model, prompts, max_new_tokens, size, temperature, top_k, top_p, eos_id, pad_id, generator):
    """`generate` on `size` prompts at a time, the results padded to one width."""
    parts = [
        generate(model, list(prompts[s : s + size]), max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, eos_id=eos_id, pad_id=pad_id, generator=generator)
        for s in range(0, len(prompts), size)
    ]  # fmt: skip
    width = max(p.tokens.size(1) for p in parts)

    def cat(name: str, fill: float) -> torch.Tensor:
        return torch.cat([F.pad(getattr(p, name), (0, width - p.tokens.size(1)), value=fill) for p in parts])

    return Generation(
        cat("tokens", pad_id), cat("logprobs", 0.0), cat("mask", 0), torch.cat([p.lengths for p in parts])
    )


def _distinct_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first, rows): the index of each distinct (prompt, padding) row's first occurrence, and for every row the
    position of its prompt in `first`; None when every row is distinct."""
    seen: dict[tuple, int] = {}
    first: list[int] = []
    rows: list[int] = []
    for b, key in enumerate(zip(map(tuple, ids.tolist()), map(tuple, mask.tolist()))):
        if key not in seen:
            seen[key] = len(first)
            first.append(b)
        rows.append(seen[key])
    if len(first) == len(rows):
        return None
    return torch.tensor(first, device=ids.device), torch.tensor(rows, device=ids.device)


def _generated_mask(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """1 up to and including each row's first EOS, 0 after it."""
    if not eos.numel():
        return torch.ones_like(tokens)
    is_eos = torch.isin(tokens, eos).long()
    before = is_eos.cumsum(-1) - is_eos  # EOS seen strictly before this position
    return (before == 0).long()


def sample_replies(
    model: GPT,
    tok: Tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], list[str], list[bool]]:
    """(reply tokens, reply texts, ended with EOS) for each prompt; temperature 0 is greedy."""
    out = generate(
        model,
        list(prompts),
        max_new_tokens,
        temperature=temperature,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        generator=generator,
    )
    replies = [t[:n] for t, n in zip(out.tokens.tolist(), out.lengths.tolist())]
    ended = [bool(r) and r[-1] == tok.eos_id for r in replies]
    return replies, [tok.decode(r) for r in replies], ended


def sample_many(
    model: GPT,
    tok: Tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    temperature: float,
    seed: int | None = None,
    batch_size: int = 128,
) -> tuple[list[list[int]], list[str], list[bool]]:
    """`sample_replies` over any number of prompts, `batch_size` rows decoding at once with continuous batching
    (`generate_queue`), one generator seeded with `seed`."""
    gen = None
    if seed is not None:
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    out = generate_queue(
        model,
        list(prompts),
        max_new_tokens,
        slots=batch_size,
        temperature=temperature,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        generator=gen,
    )
    replies = [t[:n] for t, n in zip(out.tokens.tolist(), out.lengths.tolist())]
    ended = [bool(r) and r[-1] == tok.eos_id for r in replies]
    return replies, [tok.decode(r) for r in replies], ended
