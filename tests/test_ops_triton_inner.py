"""`ops.mamba1_inner` (conv → x_proj → dt_proj → scan in one autograd node under Triton) against the composed
reference ops: the output and every input's gradient, in fp32 and under bf16 autocast, on the GPU when there
is one, else in Triton's interpreter; and what the node keeps for its backward."""

from __future__ import annotations

import pytest
import torch

from mambavl import ops

pytest.importorskip("triton")
from mambavl.ops.triton import inner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "z", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "dt_bias", "A", "D")


def _inputs(batch=2, dim=12, length=37, n=4, rank=3, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE).requires_grad_()

    xz = torch.randn(batch, length, 2 * dim, generator=g).to(DEVICE)
    x, z = (half.transpose(1, 2).detach().requires_grad_() for half in xz.chunk(2, dim=-1))
    return dict(
        x=x,
        z=z,
        conv_weight=r(dim, width, scale=0.5),
        conv_bias=r(dim, scale=0.1),
        x_proj_weight=r(rank + 2 * n, dim, scale=0.3),
        dt_proj_weight=r(dim, rank, scale=0.3),
        dt_bias=r(dim, scale=0.3),
        A=(-torch.rand(dim, n, generator=g) * 3).to(DEVICE).requires_grad_(),
        D=r(dim),
    ), (rank, n)


def _run(backend, inputs, sizes, gout, autocast=False):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        y = ops.mamba1_inner(**leaves, dt_rank=sizes[0], d_state=sizes[1], backend=backend)
    (y.float() * gout).sum().backward()
    return y.float().detach(), {k: leaves[k].grad for k in NAMES}


@pytest.mark.parametrize("length", [5, 37])
def test_fused_inner_equals_the_composed_ops(length):
    inputs, sizes = _inputs(length=length)
    gout = torch.randn(2, 12, length, device=DEVICE)
    y_ref, g_ref = _run("torch", inputs, sizes, gout)
    y_tri, g_tri = _run("triton", inputs, sizes, gout)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)
    for name in NAMES:
        scale = g_ref[name].abs().max().item()
        assert g_tri[name] is not None, name
        torch.testing.assert_close(g_tri[name], g_ref[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_fused_inner_under_bf16_autocast_matches_the_composed_ops():
    """Under autocast the projections run in bf16 in both; the two agree within bf16 rounding."""
    inputs, sizes = _inputs(length=21, seed=1)
    gout = torch.randn(2, 12, 21, device=DEVICE)
    y_ref, g_ref = _run("triton", inputs, sizes, gout, autocast=False)
    y_tri, g_tri = _run("triton", inputs, sizes, gout, autocast=True)
    torch.testing.assert_close(y_tri, y_ref, rtol=3e-2, atol=3e-2)
    for name in NAMES:
        scale = g_ref[name].abs().max().item()
        torch.testing.assert_close(g_tri[name].float(), g_ref[name], rtol=5e-2, atol=5e-2 * scale, msg=name)


def test_the_node_keeps_no_conv_output_and_no_delta():
    """What lives from forward to backward: x and z (in_proj's output, kept for in_proj anyway), the
    parameters, x_proj's [B, L, R + 2N] output and the chunk states; no other [B, D, L] tensor."""
    inputs, sizes = _inputs(length=37)
    y = inner.mamba1_inner(**inputs, dt_rank=sizes[0], d_state=sizes[1])
    saved = y.grad_fn.saved_tensors
    full = [t for t in saved if t is not None and t.dim() == 3 and tuple(t.shape) == (2, 12, 37)]
    assert len(full) == 2
    assert {t.data_ptr() for t in full} == {inputs["x"].data_ptr(), inputs["z"].data_ptr()}


# ---- the whole mixer (in_proj and out_proj taken in) -------------------------------------------------------
MIXER_NAMES = ("hidden", "in_proj_weight", "in_proj_bias", *NAMES[2:], "out_proj_weight", "out_proj_bias")


def _mixer_inputs(batch=2, dim=12, length=37, width=10, n=4, rank=3, bias=False, seed=0):
    inputs, sizes = _inputs(batch, dim, length, n, rank, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE).requires_grad_()

    del inputs["x"], inputs["z"]
    return dict(
        hidden=r(batch, length, width),
        in_proj_weight=r(2 * dim, width, scale=0.4),
        in_proj_bias=r(2 * dim, scale=0.1) if bias else None,
        **inputs,
        out_proj_weight=r(width, dim, scale=0.4),
        out_proj_bias=r(width, scale=0.1) if bias else None,
    ), sizes


def _run_mixer(backend, inputs, sizes, gout, autocast=False):
    leaves = {k: v.detach().clone().requires_grad_() if v is not None else None for k, v in inputs.items()}
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = ops.mamba1_mixer(**leaves, dt_rank=sizes[0], d_state=sizes[1], backend=backend)
    (out.float() * gout).sum().backward()
    return out.float().detach(), {k: leaves[k].grad for k in MIXER_NAMES if leaves[k] is not None}


@pytest.mark.parametrize(("length", "bias"), [(5, False), (32, True), (37, False)])
def test_fused_mixer_equals_the_composed_ops(length, bias):
    """Lengths off and on the 16-step padding; with and without projection biases."""
    inputs, sizes = _mixer_inputs(length=length, bias=bias)
    gout = torch.randn(2, length, 10, device=DEVICE)
    y_ref, g_ref = _run_mixer("torch", inputs, sizes, gout)
    y_tri, g_tri = _run_mixer("triton", inputs, sizes, gout)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)
    assert g_tri.keys() == g_ref.keys()
    for name, ref in g_ref.items():
        assert g_tri[name].dtype == ref.dtype, name
        torch.testing.assert_close(g_tri[name], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=name)


def test_fused_mixer_under_bf16_autocast_matches_the_reference():
    """Under autocast both run the projections in bf16: outputs and gradients agree within its rounding,
    and the gradients come back in the parameters' dtype."""
    inputs, sizes = _mixer_inputs(length=21, seed=2)
    gout = torch.randn(2, 21, 10, device=DEVICE)
    y_ref, g_ref = _run_mixer("torch", inputs, sizes, gout, autocast=True)
    y_tri, g_tri = _run_mixer("triton", inputs, sizes, gout, autocast=True)
    torch.testing.assert_close(y_tri, y_ref, rtol=3e-2, atol=3e-2)
    for name, ref in g_ref.items():
        assert g_tri[name].dtype == torch.float32, name
        torch.testing.assert_close(
            g_tri[name].float(), ref.float(), rtol=5e-2, atol=5e-2 * ref.abs().max().item(), msg=name
        )


def test_the_mixer_node_keeps_in_proj_output_and_the_scan_output_alone():
    """Of per-position tensors the mixer's node keeps h (in_proj's weight gradient), in_proj's output,
    x_proj's small output and the scan's output (out_proj's weight gradient), each over the B·L' padded
    positions: no conv output, no Δ, no gradient-side copy in another layout."""
    inputs, sizes = _mixer_inputs(length=37)
    out = inner.mamba1_mixer(*inputs.values(), sizes[0], sizes[1])
    assert out.shape == (2, 37, 10)
    positions = 2 * 48  # two rows of 37 steps, padded to 48
    kept = sorted(tuple(t.shape) for t in out.grad_fn.saved_tensors if t is not None and positions in t.shape)
    assert kept == sorted([(positions, 10), (24, positions), (positions, 3 + 2 * 4), (12, positions)])
