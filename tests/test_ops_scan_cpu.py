"""The CPU selective scan's hand-written backward against autograd through a plain per-step loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambavl import ops


def _naive(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """The recurrence written out step by step in fp64; autograd differentiates it."""
    delta = F.softplus(delta + delta_bias[:, None])
    h = initial_state
    ys = []
    for t in range(u.shape[-1]):
        dA = torch.exp(delta[:, :, t, None] * A)
        h = dA * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + u * D[:, None]
    return y * F.silu(z), h


def _inputs(batch, dim, n, length, seed=0):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    return dict(
        u=leaf(batch, dim, length),
        delta=leaf(batch, dim, length),
        A=(-torch.rand(dim, n, generator=g, dtype=torch.float64) * 3).requires_grad_(),
        B=leaf(batch, n, length),
        C=leaf(batch, n, length),
        D=leaf(dim),
        z=leaf(batch, dim, length),
        delta_bias=leaf(dim, scale=0.5),
        initial_state=leaf(batch, dim, n),
    )


@pytest.mark.parametrize(("batch", "dim", "n", "length"), [(2, 7, 5, 1), (3, 11, 8, 19), (1, 4, 16, 64)])
def test_cpu_scan_gradients_equal_autograd_of_the_loop(batch, dim, n, length):
    x = _inputs(batch, dim, n, length)
    y, h = ops.selective_scan(**x, delta_softplus=True, return_last_state=True, backend="torch")
    ref_x = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    y_ref, h_ref = _naive(**ref_x)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)
    gy = torch.randn_like(y_ref)
    gh = torch.randn_like(h_ref)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), list(x.values()))
    ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), list(ref_x.values()))
    for name, got, want in zip(x, grads, ref, strict=True):
        scale = want.abs().max().clamp(min=1.0)
        assert (got.double() - want).abs().max() <= 2e-4 * scale, name


def test_cpu_scan_blocks_chain_the_state(monkeypatch):
    """Sequences longer than one block continue each block from the last one's state, gradients too."""
    x = _inputs(2, 5, 4, 23, seed=1)
    y, h = ops.selective_scan(**x, delta_softplus=True, return_last_state=True, backend="torch")
    grads = torch.autograd.grad(y.square().sum() + h.sum(), list(x.values()))
    monkeypatch.setattr(ops.scan, "SCAN_BLOCK", 6)
    y6, h6 = ops.selective_scan(**x, delta_softplus=True, return_last_state=True, backend="torch")
    grads6 = torch.autograd.grad(y6.square().sum() + h6.sum(), list(x.values()))
    torch.testing.assert_close(y6, y)
    torch.testing.assert_close(h6, h)
    for got, want in zip(grads6, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cpu_scan_under_bf16_autocast_computes_in_fp32():
    """Training with --precision bf16 on a CPU: bf16 inputs and output gradient, fp32 inside."""
    x = _inputs(2, 6, 4, 9, seed=2)
    low = {
        k: (v.detach().bfloat16() if k in ("u", "delta", "B", "C", "z") else v.detach().float())
        for k, v in x.items()
    }
    low = {k: v.requires_grad_() for k, v in low.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.selective_scan(**low, delta_softplus=True, backend="torch")
    y.float().square().sum().backward()
    ref = {k: v.detach().float().requires_grad_() for k, v in low.items()}
    y_ref = ops.selective_scan(**ref, delta_softplus=True, backend="torch")
    y_ref.float().square().sum().backward()
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    for name in low:
        assert low[name].grad is not None and torch.isfinite(low[name].grad).all(), name
        torch.testing.assert_close(low[name].grad.float(), ref[name].grad, rtol=5e-2, atol=5e-2)
