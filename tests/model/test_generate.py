"""Generation: the KV cache changes nothing but speed; left padding changes nothing at all."""

from __future__ import annotations

import sys

import pytest
import torch

from llmstages.errors import UserError
from llmstages.model import GPT, generate, preset

G = sys.modules["llmstages.model.generate"]  # the module (the package exports the function under its name)


@pytest.fixture(scope="module", params=["llama_tiny", "gpt2_tiny"])
def model(request):
    torch.manual_seed(1)
    return GPT(preset(request.param, vocab_size=512, n_layers=2, block_size=64)).eval()


def _prompts(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]  # fmt: skip


def test_cache_equals_no_cache_greedy(model):
    prompts = _prompts()
    a = generate(model, prompts, 20, use_cache=True)
    b = generate(model, prompts, 20, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_batched_left_padded_equals_one_by_one(model):
    prompts = _prompts(seed=3)
    batch = generate(model, prompts, 16)
    for i, p in enumerate(prompts):
        one = generate(model, [p], 16)
        assert torch.equal(batch.tokens[i], one.tokens[0])
        assert torch.allclose(batch.logprobs[i], one.logprobs[0], atol=1e-5)


def test_logprobs_match_a_full_forward(model):
    prompt = _prompts(1)[0]
    out = generate(model, [prompt], 10, temperature=0.7, generator=torch.Generator().manual_seed(0))
    seq = torch.tensor([prompt + out.tokens[0].tolist()])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq)[0, len(prompt) - 1 : -1] / 0.7, -1)
    expected = logp.gather(-1, out.tokens[0][:, None]).squeeze(-1)
    assert torch.allclose(out.logprobs[0], expected, atol=1e-5)


def test_each_row_stops_at_its_eos(model):
    prompts = _prompts()
    free = generate(model, prompts, 12)
    eos = int(free.tokens[0, 3])  # a token row 0 emits at step 3 greedily: make it the EOS
    out = generate(model, prompts, 12, eos_id=eos, pad_id=0)
    for row, full in zip(range(len(prompts)), free.tokens):
        hits = (full == eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else full.numel()
        assert int(out.lengths[row]) == n
        assert torch.equal(out.tokens[row, :n], full[:n])
        assert (out.tokens[row, n:] == 0).all() and (out.logprobs[row, n:] == 0).all()


def test_shared_prompts_prefill_once_and_sample_as_without_cache(model):
    """GRPO's groups: each prompt G times. The prefill sees each distinct prompt once, and the replies (sampled
    with one seeded generator) equal the no-cache reference's, which recomputes every row in full."""
    distinct = _prompts(3, seed=5)
    prompts = [p for p in distinct for _ in range(4)] + [distinct[0]]  # also a repeat that is not adjacent
    rows_seen = []
    hook = model.tok_emb.register_forward_hook(lambda m, args, out: rows_seen.append(tuple(args[0].shape)))
    try:
        a = generate(model, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(7))
    finally:
        hook.remove()
    b = generate(model, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(7), use_cache=False)
    assert rows_seen[0][0] == 3 and rows_seen[1] == (len(prompts), 1)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert len({tuple(t) for t in a.tokens.tolist()}) > 3  # the rows of one prompt sampled apart


def _eos_and_shared_prompts():
    distinct = _prompts(3, seed=11)
    return [p for p in distinct for _ in range(2)] + _prompts(2, seed=12)


def test_static_cache_engine_equals_the_growing_cache(model, monkeypatch):
    """The static engine (fixed-size cache written at tensor positions, masks instead of slices), run eager here:
    the same greedy tokens and log-probs as the growing cache, with left padding, shared prompts and per-row EOS."""
    monkeypatch.setattr(G, "_compiled_forward", G._static_forward)
    prompts = _eos_and_shared_prompts()
    free = generate(model, prompts, 14)
    eos = int(free.tokens[1, 4])
    a = generate(model, prompts, 14, eos_id=eos)
    b = generate(model, prompts, 14, eos_id=eos, compile=True)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    c = generate(model, prompts, 14, temperature=1.0, generator=torch.Generator().manual_seed(2))
    d = generate(model, prompts, 14, temperature=1.0, generator=torch.Generator().manual_seed(2), compile=True)
    assert torch.equal(c.tokens, d.tokens)
    assert torch.allclose(c.logprobs, d.logprobs, atol=1e-5)


@pytest.mark.parametrize("half", ["bf16 weights", "bf16 autocast"])
def test_a_cpu_cache_keeps_half_precision_in_fp32_and_changes_nothing(model, monkeypatch, half):
    """On a CPU, keys and values in bf16 are kept in fp32 (the dtype attention reads them in, so a decode step does
    not cast the whole cache): tokens and log-probs bit-identical to a cache kept in bf16, for the growing cache,
    the static one and continuous batching."""
    import copy

    m = copy.deepcopy(model).to(torch.bfloat16) if half == "bf16 weights" else model
    prompts = _eos_and_shared_prompts()
    dtypes = []
    real = G.cache_dtype

    def recorded(t):
        dtypes.append(real(t))
        return dtypes[-1]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half == "bf16 autocast"):
            g = generate(m, prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
            s = generate(m, prompts, 10, compile=True)  # the static cache, eager where nothing compiles
            q = G.generate_queue(m, prompts * 2, 10, slots=4, eos_id=int(g.tokens[0, 2]))
        return g, s, q

    monkeypatch.setattr(G, "_compiled_forward", G._static_forward)
    monkeypatch.setattr(G, "cache_dtype", recorded)
    kept = run()
    assert dtypes and set(dtypes) == {torch.float32}
    monkeypatch.setattr(G, "cache_dtype", lambda t: t.dtype)  # the cache in the dtype it is given, as before
    given = run()
    for a, b in zip(kept, given):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
        assert torch.equal(a.logprobs, b.logprobs)


@pytest.mark.skipif(not G.can_compile(), reason="torch.compile needs a C++ compiler on a CPU")
def test_compiled_decode_step_equals_eager(model, monkeypatch):
    """torch.compile's decode step (inductor) gives the eager tokens and log-probs (fp32)."""
    monkeypatch.setattr(G, "_compiled_forward", None)
    prompts = _eos_and_shared_prompts()
    a = generate(model, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(4))
    b = generate(model, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(4), compile=True)
    assert G._compiled_forward is not G._static_forward  # it did compile
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    # continuous batching (8 slots, 64 columns: the shapes traced above) with refills, compiled against eager
    eos = int(a.tokens[0, 3])
    c = G.generate_queue(model, prompts * 2, 12, slots=8, eos_id=eos)
    d = G.generate_queue(model, prompts * 2, 12, slots=8, eos_id=eos, compile=True)
    assert torch.equal(c.tokens, d.tokens) and torch.equal(c.lengths, d.lengths)
    assert torch.allclose(c.logprobs, d.logprobs, atol=1e-5)


def test_without_a_compiler_the_engine_runs_eager(model, monkeypatch):
    monkeypatch.setattr(G, "_compiled_forward", None)
    monkeypatch.setattr(G.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    prompts = _prompts(seed=9)
    b = generate(model, prompts, 8, compile=True)
    assert G._compiled_forward is G._static_forward
    assert torch.equal(b.tokens, generate(model, prompts, 8).tokens)


def test_continuous_batching_replies_equal_generate(model):
    """Continuous batching over 3 slots for 9 prompts of different lengths, with shared prompts and per-row EOS:
    as rows finish they take waiting prompts (refills), and each prompt's greedy reply and log-probs equal
    `generate` on all the prompts in one batch (fp32). The sampled replies follow the same distributions: their
    log-probs equal a full forward over prompt + reply."""
    prompts = _eos_and_shared_prompts() + _prompts(2, seed=13)
    free = generate(model, prompts, 14)
    eos = int(free.tokens[1, 4])
    want = generate(model, prompts, 14, eos_id=eos)
    assert len(set(want.lengths.tolist())) > 1  # rows end at different steps: refills happen mid-batch
    got = G.generate_queue(model, prompts, 14, slots=3, eos_id=eos)
    assert torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.tokens, want.tokens[:, : got.tokens.size(1)])
    assert torch.equal(got.mask, want.mask[:, : got.tokens.size(1)])
    assert torch.allclose(got.logprobs, want.logprobs[:, : got.tokens.size(1)], atol=1e-5)
    s = G.generate_queue(model, prompts, 10, slots=4, temperature=1.0, eos_id=eos,
                         generator=torch.Generator().manual_seed(5))  # fmt: skip
    for p, toks, lp, n in zip(prompts, s.tokens, s.logprobs, s.lengths.tolist()):
        seq = torch.tensor([p + toks[:n].tolist()])
        with torch.no_grad():
            full = torch.log_softmax(model(seq)[0, len(p) - 1 : -1].float(), -1)
        torch.testing.assert_close(lp[:n], full.gather(-1, toks[:n, None]).squeeze(-1), rtol=0, atol=1e-5)
        assert (toks[n:] == 0).all() and (lp[n:] == 0).all()


def test_continuous_batching_rows_left_idle_stay_inside_the_context(model):
    """A row whose reply ended while nothing waits computes on unused until the batch ends or shrinks: its
    position must not run past the context. Here the 40-token prompt's row ends at the context's last position
    (40 + 24 = 64) while two other rows take the last two prompts and decode 24 more steps."""
    prompts = _prompts(2, seed=21) + [list(range(3, 43))] + _prompts(2, seed=22)
    want = generate(model, prompts, 24)
    got = G.generate_queue(model, prompts, 24, slots=3)
    assert torch.equal(got.tokens, want.tokens)
    assert torch.allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    from llmstages.model.generate import sample_next

    picks = {int(sample_next(logits, 1.0, top_k=2, generator=g)[0]) for _ in range(200)}
    assert picks == {2, 3}
    # softmax([0,1,2,3]) = [.032, .087, .237, .644]: top_p 0.7 keeps {3, 2}; top_p 0.5 keeps {3}
    picks = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)[0]) for _ in range(200)}
    assert picks == {2, 3}
    picks = {int(sample_next(logits, 1.0, top_p=0.5, generator=g)[0]) for _ in range(50)}
    assert picks == {3}


def test_draw_follows_each_rows_distribution_and_never_a_token_of_probability_zero():
    """The inverse-CDF draw: over 20,000 draws of each row, every token's frequency is within 5 standard errors
    of its probability (sqrt(p (1 - p) / n)), a token of probability 0 is never drawn (first, middle, last), and a
    row of one token always gives it."""
    probs = torch.tensor(
        [[0.0, 0.1, 0.0, 0.6, 0.3, 0.0], [0.5, 0.0, 0.25, 0.125, 0.0, 0.125], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]
    )
    n = 20_000
    tok = G.draw(probs.repeat(n, 1), torch.Generator().manual_seed(0)).view(n, 3)
    for r in range(3):
        freq = torch.bincount(tok[:, r], minlength=6).double() / n
        p = probs[r].double()
        assert bool((freq[p == 0] == 0).all()), (r, freq)
        assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all()), (r, freq, p)


def test_a_frozen_fp32_head_is_cast_once_under_autocast_with_the_same_result():
    """Under bf16 autocast a frozen fp32 head (a LoRA policy's) is held in bf16 while `generate` runs and given
    back after (the same tensor, tied to the embedding again); the tokens and log-probs equal those of the head
    autocast casts itself (one that requires grad is not swapped), bit for bit."""
    torch.manual_seed(3)
    m = GPT(preset("llama_tiny", vocab_size=512, n_layers=2, block_size=64)).eval().requires_grad_(False)
    w = m.lm_head.weight
    seen = []

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return generate(m, _prompts(3, seed=5), 12, temperature=1.0,
                            generator=torch.Generator().manual_seed(2),
                            on_token=lambda _: seen.append(m.lm_head.weight.dtype))  # fmt: skip

    swapped = run()
    assert set(seen) == {torch.bfloat16} and m.lm_head.weight is w and w is m.tok_emb.weight
    assert w.dtype == torch.float32
    w.requires_grad_(True)
    seen.clear()
    plain = run()
    assert set(seen) == {torch.float32}
    assert torch.equal(swapped.tokens, plain.tokens) and torch.equal(swapped.logprobs, plain.logprobs)


def test_each_lora_layers_adapter_is_cast_once_per_call_with_the_same_tokens(monkeypatch):
    """While `generate` runs under bf16 autocast, each LoRA layer's A, B (fp32 trainable) are cast to bf16 once
    and the same copies serve every step; the tokens and log-probs equal, bit for bit, those of casting at every
    step (the textbook path, patched in); the copies are dropped after, and a forward with grad never uses them."""
    from llmstages.peft import apply_lora
    from llmstages.peft.lora import LoRALinear
    from llmstages.train.frozen import hold_frozen

    torch.manual_seed(4)
    m = GPT(preset("llama_tiny", vocab_size=512, n_layers=2, block_size=64)).eval()
    apply_lora(m, rank=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    hold_frozen(m, "bf16")
    layer = m.blocks[0].attn.q_proj
    seen: list[tuple] = []

    def look(_):
        seen.append((layer.sampling_casts or {}).get(torch.bfloat16))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return generate(m, _prompts(3, seed=5), 12, temperature=1.0,
                            generator=torch.Generator().manual_seed(2), on_token=look)  # fmt: skip

    once = run()
    assert len(seen) == 12 and seen[0] is not None and all(c is seen[0] for c in seen)
    a, b, _ = seen[0]
    assert a.dtype == torch.bfloat16 and torch.equal(a, layer.lora_A.weight.to(torch.bfloat16))
    assert torch.equal(b, layer.lora_B.weight.to(torch.bfloat16))
    assert all(x.sampling_casts is None for x in m.modules() if isinstance(x, LoRALinear))

    def every_step(self, dt):
        return self.lora_A.weight.to(dt), self.lora_B.weight.to(dt), None if self.bias is None else self.bias.to(dt)

    monkeypatch.setattr(LoRALinear, "_in_dtype", every_step)
    each = run()
    assert torch.equal(once.tokens, each.tokens) and torch.equal(once.logprobs, each.logprobs)
    monkeypatch.undo()

    layer.sampling_casts = {torch.bfloat16: (a.zero_(), b.zero_(), None)}  # stale copies: must not serve training
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randint(3, 512, (2, 8))).float().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.abs().sum() > 0


def test_prompt_too_long(model):
    with pytest.raises(UserError, match="exceeds the model's context of 64"):
        generate(model, [[5] * 60], 10)
