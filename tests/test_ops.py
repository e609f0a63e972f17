"""The reference ops against the textbook recurrences they implement, written here as plain loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from mambavl import ops
from mambavl.ops import scan as scan_mod


def loop_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, h=None):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t; y_t = C_t·h_t + D u_t; B, C: [b, n, l] or [b, g, n, l]."""
    b, d, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if softplus:
        delta = F.softplus(delta)
    if B.dim() == 4:
        B = B.repeat_interleave(d // B.shape[1], dim=1)  # [b, d, n, l]
        C = C.repeat_interleave(d // C.shape[1], dim=1)
    else:
        B, C = B[:, None], C[:, None]
    h = torch.zeros(b, d, A.shape[1]) if h is None else h.clone()
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u[:, :, :0]
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y, h


def loop_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, softplus=False, h=None, limit=(0.0, math.inf)):
    """Mamba-2 per head: h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_tᵀ; y_t = h_t C_t + D x_t."""
    b, length, nh, p = x.shape
    g = B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias
    if softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(*limit)
    B = B.repeat_interleave(nh // g, dim=2)
    C = C.repeat_interleave(nh // g, dim=2)
    h = torch.zeros(b, nh, p, B.shape[-1]) if h is None else h.clone()
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y, h


def mamba1_inputs(b=2, d=6, n=4, length=19, groups=None, scale=1.0):
    u = torch.randn(b, d, length)
    delta = torch.randn(b, d, length) * 0.5
    A = -torch.rand(d, n) * 4 * scale - 0.1
    shape = (b, n, length) if groups is None else (b, groups, n, length)
    return u, delta, A, torch.randn(shape), torch.randn(shape)


@pytest.mark.parametrize("length", [1, 7, 64, scan_mod.SCAN_BLOCK + 45])
@pytest.mark.parametrize("groups", [None, 2])
def test_selective_scan_equals_recurrence(length, groups):
    u, delta, A, B, C = mamba1_inputs(length=length, groups=groups)
    D, z, bias = torch.randn(6), torch.randn(2, 6, length), torch.randn(6)
    h0 = torch.randn(2, 6, 4)
    y, last = ops.selective_scan(
        u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True, initial_state=h0
    )
    y_ref, last_ref = loop_selective_scan(u, delta, A, B, C, D, z, bias, softplus=True, h=h0)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, last_ref, atol=1e-5, rtol=1e-5)


def test_selective_scan_split_continues_exactly():
    u, delta, A, B, C = mamba1_inputs(length=50)
    y, last = ops.selective_scan(u, delta, A, B, C, return_last_state=True)
    y1, h = ops.selective_scan(
        u[..., :21], delta[..., :21], A, B[..., :21], C[..., :21], return_last_state=True
    )
    y2, h = ops.selective_scan(
        u[..., 21:], delta[..., 21:], A, B[..., 21:], C[..., 21:], return_last_state=True, initial_state=h
    )
    torch.testing.assert_close(torch.cat([y1, y2], -1), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, last, atol=1e-5, rtol=1e-5)


def test_selective_scan_is_stable_under_strong_decay():
    # |Δ·A| summed over a block reaches ~1e4: exp(-cumsum) tricks overflow here, the scan must not.
    u, delta, A, B, C = mamba1_inputs(length=300, scale=50.0)
    delta = delta.abs() + 1.0
    y = ops.selective_scan(u, delta, A, B, C)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, loop_selective_scan(u, delta, A, B, C)[0], atol=1e-5, rtol=1e-5)


def test_selective_scan_gradients_equal_recurrence():
    u, delta, A, B, C = mamba1_inputs(length=40)
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C)]
    got = torch.autograd.grad(ops.selective_scan(*leaves, delta_softplus=True).square().sum(), leaves)
    want = torch.autograd.grad(loop_selective_scan(*leaves, softplus=True)[0].square().sum(), leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_bf16_inputs_give_bf16_output_and_fp32_state():
    u, delta, A, B, C = mamba1_inputs()
    y, h = ops.selective_scan(
        u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), return_last_state=True
    )
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32


def test_state_update_mamba1_layout_equals_scan():
    u, delta, A, B, C = mamba1_inputs(length=9)
    D, z, bias = torch.randn(6), torch.randn(2, 6, 9), torch.randn(6)
    y_ref, last = ops.selective_scan(u, delta, A, B, C, D, z, bias, True, return_last_state=True)
    state = torch.zeros(2, 6, 4)
    ys = [
        ops.selective_state_update(
            state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias, dt_softplus=True
        )
        for t in range(9)
    ]
    torch.testing.assert_close(torch.stack(ys, -1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, last, atol=1e-5, rtol=1e-5)


def ssd_inputs(b=2, length=37, nh=6, p=3, g=2, n=5):
    return (
        torch.randn(b, length, nh, p),
        torch.randn(b, length, nh),
        -torch.rand(nh) * 3 - 0.1,
        torch.randn(b, length, g, n),
        torch.randn(b, length, g, n),
    )


@pytest.mark.parametrize("length,chunk", [(1, 8), (8, 8), (9, 8), (37, 8), (37, 64), (100, 16)])
@pytest.mark.parametrize("d_per_channel", [False, True])
def test_chunk_scan_equals_recurrence(length, chunk, d_per_channel):
    x, dt, A, B, C = ssd_inputs(length=length)
    D = torch.randn(6, 3) if d_per_channel else torch.randn(6)
    z, bias, h0 = torch.randn_like(x), torch.randn(6), torch.randn(2, 6, 3, 5)
    y, final = ops.mamba_chunk_scan_combined(
        x,
        dt,
        A,
        B,
        C,
        chunk,
        D=D,
        z=z,
        dt_bias=bias,
        dt_softplus=True,
        initial_states=h0,
        return_final_states=True,
    )
    y_ref, final_ref = loop_ssd(x, dt, A, B, C, D, z, bias, softplus=True, h=h0)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, final_ref, atol=1e-5, rtol=1e-5)


def test_chunk_scan_dt_limit_is_applied():
    x, dt, A, B, C = ssd_inputs()
    limit = (0.05, 0.3)
    y = ops.mamba_chunk_scan_combined(x, dt, A, B, C, 8, dt_softplus=True, dt_limit=limit)
    torch.testing.assert_close(
        y, loop_ssd(x, dt, A, B, C, softplus=True, limit=limit)[0], atol=1e-5, rtol=1e-5
    )


def test_state_update_mamba2_layout_equals_chunk_scan():
    x, dt, A, B, C = ssd_inputs(length=6)
    D, bias = torch.randn(6), torch.randn(6)
    y_ref, final = ops.mamba_chunk_scan_combined(
        x, dt, A, B, C, 4, D=D, dt_bias=bias, dt_softplus=True, return_final_states=True
    )
    state = torch.zeros(2, 6, 3, 5)
    ys = [
        ops.selective_state_update(
            state,
            x[:, t],
            dt[:, t, :, None].expand(-1, -1, 3),
            A[:, None, None].expand(6, 3, 5),
            B[:, t],
            C[:, t],
            D[:, None].expand(6, 3),
            dt_bias=bias[:, None].expand(6, 3),
            dt_softplus=True,
        )
        for t in range(6)
    ]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, final, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [2, 4, 5])
def test_causal_conv1d_sequence_update_and_continuation(width):
    x, w, bias = torch.randn(2, 5, 13), torch.randn(5, width), torch.randn(5)
    want = F.silu(F.conv1d(x, w[:, None], bias, padding=width - 1, groups=5)[..., :13])
    torch.testing.assert_close(ops.causal_conv1d_fn(x, w, bias, activation="silu"), want)
    # step by step through a conv state of width W (mamba_ssm's layout)
    state = torch.zeros(2, 5, width)
    steps = torch.stack([ops.causal_conv1d_update(x[..., t], state, w, bias, "silu") for t in range(13)], -1)
    torch.testing.assert_close(steps, want)
    torch.testing.assert_close(state, x[..., -width:])
    # a sequence continued from the inputs before it
    y2, final = ops.causal_conv1d_fn(
        x[..., 6:],
        w,
        bias,
        initial_states=x[..., 6 - (width - 1) : 6],
        return_final_states=True,
        activation="silu",
    )
    torch.testing.assert_close(y2, want[..., 6:])
    torch.testing.assert_close(final, x[..., 13 - (width - 1) :])


def test_causal_conv1d_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        ops.causal_conv1d_fn(torch.randn(1, 2, 3), torch.randn(2, 4), activation="gelu")


def test_rms_norm_with_residual():
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    y, res = ops.rms_norm(x.bfloat16(), w, 1e-6, residual=r, prenorm=True, residual_in_fp32=True)
    s = x.bfloat16().float() + r
    torch.testing.assert_close(res, s)
    want = s / s.square().mean(-1, keepdim=True).add(1e-6).sqrt() * w
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm_groups(norm_before_gate):
    x, z, w = torch.randn(2, 3, 12), torch.randn(2, 3, 12), torch.randn(12)
    y = ops.rms_norm_gated(x, w, z, 1e-5, group_size=4, norm_before_gate=norm_before_gate)
    parts = []
    for gi in range(3):
        sl = slice(4 * gi, 4 * gi + 4)
        xi = x[..., sl] if norm_before_gate else x[..., sl] * F.silu(z[..., sl])
        yi = ops.rms_norm(xi, w[sl], 1e-5)
        parts.append(yi * F.silu(z[..., sl]) if norm_before_gate else yi)
    torch.testing.assert_close(y, torch.cat(parts, -1))
