"""The decode-step kernels against their references: the skinny linear (few rows, 16-bit weights) and
the fused Mamba-1 step between the projections. On the GPU when there is one, else in Triton's
interpreter, on small odd shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from mambavl import ops
from mambavl.ops.triton.step import FUSED_MAX_BATCH

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows", [(1,), (3, 1), (16,), (2, 1, 5)])
@pytest.mark.parametrize("n,k", [(37, 50), (130, 300), (24, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_skinny_linear_equals_f_linear(rows, n, k, dtype, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*rows, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    out = ops.linear(x, w, b, backend="triton")
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert out.shape == (*rows, n) and out.dtype == dtype
    # One rounding of an fp32 accumulation: within half an ulp of the output's dtype, and no worse.
    torch.testing.assert_close(out.float(), ref, rtol=8e-3, atol=8e-3)
    assert (out.float() - ref).abs().max() <= (out.to(dtype).float() - ref).abs().max() + 1e-6


def test_linear_keeps_f_linear_where_the_kernel_does_not_apply():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 12, generator=g).to(DEVICE)
    # fp32, too many rows, and a call that needs a gradient all take F.linear, under every backend.
    for x in (torch.randn(2, 12, generator=g), torch.randn(40, 12, generator=g)):
        x = x.to(DEVICE)
        assert torch.equal(ops.linear(x, w, backend="triton"), F.linear(x, w))
    wb = w.to(torch.bfloat16).requires_grad_()
    x = torch.randn(1, 12, generator=g).to(DEVICE, torch.bfloat16)
    out = ops.linear(x, wb, backend="triton")
    out.sum().backward()
    assert wb.grad is not None and torch.equal(out, F.linear(x, wb))


def test_skinny_linear_refuses_bad_calls():
    from mambavl.ops.triton.gemv import skinny_linear

    x = torch.randn(2, 12, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="features"):
        skinny_linear(x, torch.randn(8, 11, device=DEVICE, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="at most"):
        skinny_linear(torch.randn(17, 12, device=DEVICE, dtype=torch.bfloat16), x[:1].expand(8, 12))
    with pytest.raises(ValueError, match="bf16 or fp16"):
        skinny_linear(x.float(), torch.randn(8, 12, device=DEVICE))


def _step_inputs(batch, dim, n, rank, width, state_len, dtype, norm, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    weights = dict(
        conv_weight=r(dim, width, scale=0.5).to(dtype),
        conv_bias=r(dim, scale=0.1).to(dtype),
        x_proj_weight=r(rank + 2 * n, dim, scale=dim**-0.5).to(dtype),
        dt_proj_weight=r(dim, rank, scale=rank**-0.5).to(dtype),
        dt_proj_bias=r(dim, scale=0.5).to(dtype),
        A=-torch.rand(dim, n, generator=g).to(DEVICE) * 4,
        D=r(dim).to(dtype),
    )
    if norm == "weighted":
        weights["bcdt_norm"] = (r(rank).to(dtype), r(n).to(dtype), r(n).to(dtype), 1e-6)
    elif norm == "plain":
        weights["bcdt_norm"] = (None, None, None, 1e-6)
    state = dict(conv_state=r(batch, dim, state_len), ssm_state=r(batch, dim, n))
    return weights, state, g


@pytest.mark.parametrize("batch,dim,n,rank", [(1, 37, 5, 3), (3, 130, 16, 9), (19, 64, 4, 1)])
@pytest.mark.parametrize("width,state_len", [(4, 4), (4, 3), (2, 5)])
@pytest.mark.parametrize("norm", [None, "plain", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba1_step_triton_equals_reference(batch, dim, n, rank, width, state_len, norm, dtype):
    weights, state, g = _step_inputs(batch, dim, n, rank, width, state_len, dtype, norm)
    if dtype == torch.bfloat16:
        weights["D"] = None if norm == "plain" else weights["D"]  # the skip is optional too
    ref_state = {k: v.clone() for k, v in state.items()}
    tri_state = {k: v.clone() for k, v in state.items()}
    fused = batch <= FUSED_MAX_BATCH
    # The fused kernels compute in fp32 from the given inputs and round only y: their reference is the
    # op's fp32 math on the same (upcast) inputs. More sequences run the single ops, rounding as the
    # reference does.
    ref_weights = dict(weights)
    if fused:
        ref_weights = {k: v.float() if torch.is_tensor(v) else v for k, v in weights.items()}
        if weights.get("bcdt_norm") is not None:
            ref_weights["bcdt_norm"] = tuple(
                t.float() if torch.is_tensor(t) else t for t in weights["bcdt_norm"]
            )
    # Three steps in a row: the windows and states the kernels leave behind feed the next step.
    for _ in range(3):
        xz = torch.randn(batch, 2 * dim, generator=g).to(DEVICE, dtype)
        ref = ops.mamba1_step(xz.float() if fused else xz, **ref_state, **ref_weights, backend="torch")
        tri = ops.mamba1_step(xz, **tri_state, **weights, backend="triton")
        assert tri.shape == ref.shape == (batch, dim) and tri.dtype == dtype
        torch.testing.assert_close(tri_state["conv_state"], ref_state["conv_state"], rtol=1e-5, atol=1e-5)
        pairs = ((tri.float(), ref.float()), (tri_state["ssm_state"], ref_state["ssm_state"]))
        if dtype == torch.float32 or fused:
            out_tol = 1e-4 if dtype == torch.float32 else 1e-2  # the fused path rounds y once
            torch.testing.assert_close(*pairs[0], rtol=out_tol, atol=out_tol)
            torch.testing.assert_close(*pairs[1], rtol=1e-4, atol=1e-4)
        else:
            # bf16 through the single ops rounds x, dt, B and C as the reference does, but a value on a
            # rounding boundary may land the other way (the kernels sum in another order): a few
            # isolated elements, each off by a few bf16 ulps.
            for got, want in pairs:
                rel = (got - want).abs() / (1 + want.abs())
                assert (rel > 2e-2).float().mean() < 1e-2 and rel.max() < 0.2


def test_mamba1_step_refuses_bad_shapes_and_training():
    weights, state, _ = _step_inputs(1, 8, 4, 2, 4, 4, torch.float32, None)
    with pytest.raises(ValueError, match="xz must be"):
        ops.mamba1_step(torch.zeros(1, 8, device=DEVICE), **state, **weights)
    wrong = dict(weights, x_proj_weight=weights["x_proj_weight"][:-1])
    with pytest.raises(ValueError, match="x_proj_weight"):
        ops.mamba1_step(torch.zeros(1, 16, device=DEVICE), **state, **wrong)
    trained = dict(weights, D=weights["D"].clone().requires_grad_())
    with pytest.raises(NotImplementedError, match="backward"):
        ops.mamba1_step(torch.zeros(1, 16, device=DEVICE), **state, **trained, backend="triton")
