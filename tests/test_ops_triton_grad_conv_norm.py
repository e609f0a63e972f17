"""The Triton causal conv1d, RMSNorm (residual add fused) and gated RMSNorm with their backward kernels,
against the PyTorch references' autograd: outputs and the gradient of every input, on the GPU when there
is one, else in Triton's interpreter (TRITON_INTERPRET=1, set by conftest), on small odd shapes."""

from __future__ import annotations

import pytest
import torch

from mambavl import ops

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-2


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Elementwise within tol relative, or tol of the largest magnitude (sums of many terms)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = max(1.0, expected.float().abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def _compare(run, inputs: dict, tol: float) -> None:
    """run(backend, **inputs) -> output(s); outputs and the gradients of every input that has one agree."""
    leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    outs = {}
    for backend in ("torch", "triton"):
        out = run(backend, **inputs)
        outs[backend] = out if isinstance(out, tuple) else (out,)
    seeds = [torch.randn_like(o) for o in outs["torch"]]
    grads = {b: torch.autograd.grad(o, leaves, seeds) for b, o in outs.items()}
    for t, r in zip(outs["triton"] + grads["triton"], outs["torch"] + grads["torch"], strict=True):
        _assert_close(t, r, tol)


# --- causal conv1d


def _conv_inputs(batch, dim, length, width, dtype, bias, initial, layout, w_dtype=torch.float32):
    t = dict(device=DEVICE)
    if layout == "channels":  # a transposed slice of a [B, L, D'] projection, as the mixers pass it
        x = torch.randn(batch, length, 2 * dim + 3, **t)[:, :, 3 : 3 + dim].transpose(1, 2)
    elif layout == "channel_major":  # a slice of a [2D, B, L] projection computed as W·hᵀ
        x = torch.randn(2 * dim, batch, length, **t)[dim:].transpose(0, 1)
    else:
        x = torch.randn(batch, dim, length, **t)
    return dict(
        x=x.to(dtype).requires_grad_(),
        weight=(torch.randn(dim, width, **t) / width).to(w_dtype).requires_grad_(),
        bias=torch.randn(dim, **t).requires_grad_() if bias else None,
        # the last W-1 columns of a width-W window, as a model's decode state holds them
        initial_states=torch.randn(batch, dim, width, **t)[..., 1:].requires_grad_() if initial else None,
    )


def _conv(activation, final=False):
    def run(backend, **kw):
        return ops.causal_conv1d_fn(
            **kw, return_final_states=final, activation=activation, backend=backend
        )  # fmt: skip

    return run


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize(
    "length,layout,bias,activation,initial",
    [
        (37, "channels", True, "silu", True),  # the mixers' call, continued from a window
        (37, "time", False, None, False),
        (70, "channels", True, "silu", False),  # several time tiles, a ragged last one
        (2, "time", True, "silu", True),  # shorter than the window: outputs read the initial states
    ],
)
def test_conv_fp32_grads(width, length, layout, bias, activation, initial):
    inputs = _conv_inputs(2, 37, length, width, torch.float32, bias, initial, layout)
    _compare(_conv(activation), inputs, _tol(torch.float32))


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_conv_bf16_grads(w_dtype):
    inputs = _conv_inputs(2, 41, 53, 4, torch.bfloat16, True, True, "channels", w_dtype)
    _compare(_conv("silu"), inputs, _tol(torch.bfloat16))


@pytest.mark.parametrize("length,initial", [(1, True), (2, False), (29, True)])
def test_conv_final_states_and_their_grads(length, initial):
    """The final window (last W-1 inputs, fp32) equals the reference's, and a loss on it flows back to
    x and the initial states."""
    inputs = _conv_inputs(2, 19, length, 4, torch.float32, True, initial, "channels")
    _compare(_conv("silu", final=True), inputs, _tol(torch.float32))
    _, final = ops.causal_conv1d_fn(**inputs, return_final_states=True, activation="silu", backend="triton")
    assert final.dtype == torch.float32 and final.shape == (2, 19, 3)


def test_conv_keeps_the_channel_layout_and_reads_any_grad_strides():
    inputs = _conv_inputs(2, 37, 45, 4, torch.float32, True, False, "channels")
    y = ops.causal_conv1d_fn(**inputs, activation="silu", backend="triton")
    assert y.stride(1) == 1  # channel-contiguous like x: the [B, L, D] consumers read it without a copy
    (dx,) = torch.autograd.grad(y.transpose(1, 2)[:, ::2].sum(), [inputs["x"]])  # a strided dy
    ref = ops.causal_conv1d_fn(**inputs, activation="silu", backend="torch")
    (dx_ref,) = torch.autograd.grad(ref.transpose(1, 2)[:, ::2].sum(), [inputs["x"]])
    assert dx.stride(1) == 1
    _assert_close(dx, dx_ref, _tol(torch.float32))


@pytest.mark.parametrize("layout", ["time", "channel_major", "channels"])
def test_conv_grads_across_programs_and_their_halos(layout):
    """Rows long enough that the backward splits time between programs: each computes the gradient at
    the W-1 positions after its share (the halo) itself; with the initial and final windows."""
    inputs = _conv_inputs(2, 13, 150, 4, torch.float32, True, True, layout)
    _compare(_conv("silu", final=True), inputs, _tol(torch.float32))
    y = ops.causal_conv1d_fn(**inputs, activation="silu", backend="triton")
    (dx,) = torch.autograd.grad(y, [inputs["x"]], torch.ones_like(y))
    x = inputs["x"]  # outputs and gradients keep x's layout (compact where x is a slice)
    assert dx.stride() == y.stride()
    assert sorted(range(3), key=y.stride) == sorted(range(3), key=x.stride)


@pytest.mark.parametrize("width,layout", [(5, "channels"), (6, "time")])
def test_conv_wider_than_four(width, layout):
    """Widths 1..4 run the four-column kernels; wider ones the general kernels, with the same contract."""
    inputs = _conv_inputs(2, 11, 41, width, torch.float32, True, True, layout)
    _compare(_conv("silu", final=True), inputs, _tol(torch.float32))


@pytest.mark.parametrize("layout", ["channels", "time"])
def test_conv_width_one(layout):
    inputs = _conv_inputs(2, 7, 19, 1, torch.float32, True, False, layout)
    _compare(_conv("silu"), inputs, _tol(torch.float32))


def test_conv_only_some_inputs_need_grads():
    inputs = _conv_inputs(1, 13, 21, 3, torch.float32, True, True, "time")
    inputs["x"].requires_grad_(False)
    inputs["initial_states"].requires_grad_(False)
    _compare(_conv("silu"), inputs, _tol(torch.float32))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_grads_larger(dtype):
    inputs = _conv_inputs(2, 203, 333, 4, dtype, True, True, "channels")
    _compare(_conv("silu", final=True), inputs, _tol(dtype))


# --- RMSNorm with the residual add


def _norm_inputs(width, dtype, residual, weight, res_dtype=torch.float32, strided=False):
    t = dict(device=DEVICE)
    x = torch.randn(2, 5, width + (3 if strided else 0), **t)[..., :width]  # strided: rows of a wider tensor
    return dict(
        x=x.to(dtype).requires_grad_(),
        weight=(1 + 0.3 * torch.randn(width, **t)).requires_grad_() if weight else None,
        residual=torch.randn(2, 5, width, **t).to(res_dtype).requires_grad_() if residual else None,
    )


def _norm(prenorm, residual_in_fp32):
    def run(backend, **kw):
        return ops.rms_norm(
            kw["x"], kw["weight"], 1e-5, kw["residual"], prenorm, residual_in_fp32, backend=backend
        )  # fmt: skip

    return run


@pytest.mark.parametrize("width", [64, 97])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "residual,prenorm,residual_in_fp32",
    [
        (False, False, False),
        (True, True, True),
        (True, True, False),
        (True, False, False),
        (False, True, True),
    ],
)
@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_grads(width, dtype, residual, prenorm, residual_in_fp32, weight):
    res_dtype = torch.float32 if residual_in_fp32 else dtype
    inputs = _norm_inputs(width, dtype, residual, weight, res_dtype)
    _compare(_norm(prenorm, residual_in_fp32), inputs, _tol(dtype))


def test_rms_norm_grads_mixed_dtypes_and_strided_rows():
    """A bf16 x on an fp32 stream (the pre-norm block), x a slice of a wider tensor."""
    inputs = _norm_inputs(45, torch.bfloat16, True, True, torch.float32, strided=True)
    _compare(_norm(True, True), inputs, _tol(torch.bfloat16))


def test_rms_norm_only_the_new_residual_is_used():
    """A loss on the new residual alone (the last block's norm output unused) still reaches x."""
    inputs = _norm_inputs(33, torch.float32, True, True)
    inputs["weight"].requires_grad_(False)  # no path from the new residual to the weight

    def run(backend, **kw):
        return _norm(True, True)(backend, **kw)[1]

    _compare(run, inputs, _tol(torch.float32))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_grads_model_width(dtype):
    inputs = _norm_inputs(2560, dtype, True, True)
    _compare(_norm(True, True), inputs, _tol(dtype))


# --- the gated, grouped RMSNorm


def _gated(group_size, norm_before_gate):
    def run(backend, **kw):
        return ops.rms_norm_gated(
            kw["x"], kw["weight"], kw["z"], 1e-5, group_size, norm_before_gate, backend=backend
        )  # fmt: skip

    return run


@pytest.mark.parametrize("width,group_size", [(96, None), (96, 32), (90, 15)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", ["before", "after", None])
def test_rms_norm_gated_grads(width, group_size, dtype, gate):
    t = dict(device=DEVICE)
    inputs = dict(
        x=torch.randn(3, 7, width, **t).to(dtype).requires_grad_(),
        weight=(1 + 0.3 * torch.randn(width, **t)).requires_grad_(),
        z=torch.randn(3, 7, width, **t).to(dtype).requires_grad_() if gate else None,
    )
    _compare(_gated(group_size, gate != "after"), inputs, _tol(dtype))


def test_rms_norm_gated_refuses_a_group_that_does_not_divide():
    x = torch.randn(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match="group_size"):
        ops.rms_norm_gated(x, torch.ones(10, device=DEVICE), None, group_size=4, backend="triton")


@pytest.mark.slow
@pytest.mark.parametrize("group_size", [None, 640])
def test_rms_norm_gated_grads_model_width(group_size):
    t = dict(device=DEVICE)
    inputs = dict(
        x=torch.randn(9, 5120, **t).to(torch.bfloat16).requires_grad_(),
        weight=torch.randn(5120, **t).requires_grad_(),
        z=torch.randn(9, 5120, **t).to(torch.bfloat16).requires_grad_(),
    )
    _compare(_gated(group_size, False), inputs, _tol(torch.bfloat16))


# --- dispatch: training under the triton backend runs the kernels


def test_triton_backend_trains_with_the_kernels(monkeypatch):
    """MAMBAVL_BACKEND=triton: calls that need gradients run the autograd Functions, never the
    reference (which is made to fail here)."""
    import mambavl.ops.conv as conv_ref
    import mambavl.ops.norms as norms_ref

    monkeypatch.setenv("MAMBAVL_BACKEND", "triton")

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(conv_ref.F, "conv1d", refuse)
    monkeypatch.setattr(norms_ref.torch, "rsqrt", refuse)
    x = torch.randn(2, 9, 11, device=DEVICE, requires_grad=True)
    w = torch.randn(9, 4, device=DEVICE, requires_grad=True)
    y, final = ops.causal_conv1d_fn(x, w, return_final_states=True, activation="silu")
    assert type(y.grad_fn).__name__ == "_CausalConv1dBackward"
    h = torch.randn(2, 11, 9, device=DEVICE, requires_grad=True)
    out, res = ops.rms_norm(y.transpose(1, 2), w[:, 0], 1e-5, h, prenorm=True, residual_in_fp32=True)
    assert type(out.grad_fn).__name__ == "_RMSNormBackward"
    gated = ops.rms_norm_gated(out, w[:, 1], h, group_size=3)
    assert type(gated.grad_fn).__name__ == "_GatedRMSNormBackward"
    (gated.sum() + res.sum() + final.sum()).backward()
    assert x.grad is not None and w.grad is not None and h.grad is not None
