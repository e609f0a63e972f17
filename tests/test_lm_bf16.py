"""bf16 weights: a 2k-token sequence stays finite and close to the fp32 model, and bf16 decoding
follows the bf16 full forward."""

import copy

import pytest
import torch

import refmodels
from mambavl.lm import load_lm


@torch.no_grad()
@pytest.mark.parametrize(
    "name,max_err",
    [
        ("mamba-tied-bias-rank5", 0.03),
        ("mamba2-groups2-untied", 0.05),
        # bf16 rounding flips a few top-2 expert choices, a discontinuity: the worst token moves more
        ("jamba-attn-moe-gqa", 0.2),
    ],
)
def test_bf16_long_sequence_close_to_fp32(tmp_path, name, max_err):
    lm32 = load_lm(refmodels.save(refmodels.make(name), tmp_path / name))
    lm16 = copy.deepcopy(lm32).to(torch.bfloat16)
    ids = torch.randint(0, lm32.config.vocab_size, (1, 2048))
    ref, out = lm32(ids), lm16(ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = (out.float() - ref).abs()
    scale = ref.abs().max()
    print(
        f"{name}: bf16 vs fp32 over 2048 tokens, relative to max|logit|: "
        f"max {err.max() / scale:.2e}, mean {err.mean() / scale:.2e}"
    )
    assert err.max() <= max_err * scale and err.mean() <= 0.005 * scale
    # the next-token choice agrees almost everywhere
    agree = (out.float().argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.95

    # decoding in bf16 continues the bf16 forward: prefill 2000 tokens, then 48 single steps
    state = lm16.new_state(1)
    parts = [lm16(ids[:, :2000], state=state)] + [
        lm16(ids[:, t : t + 1], state=state) for t in range(2000, 2048)
    ]
    step_err = (torch.cat(parts, 1).float() - out.float()).abs().max()
    assert step_err <= max_err * scale


@torch.no_grad()
@pytest.mark.parametrize("heads,kv,T", [(6, 2, 37), (4, 4, 1), (8, 1, 129)])
def test_half_prefill_attention_equals_fp32_within_bf16(heads, kv, T):
    """The GPU's 16-bit prefill attention (grouped keys read in place) against the fp32 reference with the
    keys repeated per head: equal within bf16 rounding, causal."""
    from mambavl.lm.attention import causal_half

    gen = torch.Generator().manual_seed(heads * 100 + T)
    q, k, v = (torch.randn(2, h, T, 16, generator=gen) for h in (heads, kv, kv))
    k_rep, v_rep = (x.repeat_interleave(heads // kv, dim=1) for x in (k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=T > 1)
    out = causal_half(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    # causal: the first query sees only the first key
    torch.testing.assert_close(out[:, :, 0].float(), v_rep[:, :, 0], atol=1e-2, rtol=1e-2)
