"""The Triton SSD chunked scan against its PyTorch reference: on the GPU when there is one, else in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest), on small shapes with odd sizes and partial chunks."""

from __future__ import annotations

import pytest
import torch

from mambavl import ops

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = dict(rtol=1e-4, atol=1e-4)
# 16-bit inputs: on a GPU the matmuls take 16-bit operands (rounded fp32 intermediates), so an output that
# cancels can be off by a little more than its own rounding; over the whole tensor the error stays near it.
# (The interpreter's casts to bf16 truncate: its outputs are off by up to one unit in the last place.)
BF16 = dict(rtol=2e-2, atol=5e-2)


def _inputs(batch=2, length=37, heads=4, p=6, groups=2, n=5, dtype=torch.float32):
    def r(*shape):
        return torch.randn(*shape, device=DEVICE)

    return dict(
        x=r(batch, length, heads, p).to(dtype),
        dt=r(batch, length, heads).to(dtype),
        A=-torch.rand(heads, device=DEVICE) * 3 - 0.1,
        B=r(batch, length, groups, n).to(dtype),
        C=r(batch, length, groups, n).to(dtype),
        D=r(heads, p),
        z=r(batch, length, heads, p).to(dtype),
        dt_bias=r(heads),
        initial_states=r(batch, heads, p, n),
    )


def _compare(inputs, chunk, tol, **options):
    y_ref, final_ref = ops.mamba_chunk_scan_combined(
        **inputs, chunk_size=chunk, return_final_states=True, **options, backend="torch"
    )
    y_tri, final_tri = ops.mamba_chunk_scan_combined(
        **inputs, chunk_size=chunk, return_final_states=True, **options, backend="triton"
    )
    assert y_tri.dtype == y_ref.dtype and y_tri.shape == y_ref.shape
    assert final_tri.dtype == torch.float32 and final_tri.shape == final_ref.shape
    for tri, ref in ((y_tri.float(), y_ref.float()), (final_tri, final_ref)):
        torch.testing.assert_close(tri, ref, **tol)
        assert (tri - ref).norm() <= tol["rtol"] / 2 * ref.norm()


@pytest.mark.parametrize("length,chunk", [(37, 8), (32, 16), (5, 16), (1, 8)])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_triton_equals_reference(length, chunk, groups, dtype):
    inputs = _inputs(length=length, groups=groups, dtype=dtype)
    tol = FP32 if dtype == torch.float32 else BF16
    _compare(inputs, chunk, tol, dt_softplus=True, dt_limit=(0.01, 1.5))


@pytest.mark.parametrize(
    "drop,options",
    [
        (("D", "z", "dt_bias", "initial_states"), dict()),
        (("z", "dt_bias", "initial_states"), dict()),
        (("D", "dt_bias"), dict(dt_softplus=True)),
        ((), dict(dt_softplus=True)),
        (("initial_states",), dict(dt_softplus=True, dt_limit=(0.05, 0.3))),
        ((), dict(dt_softplus=True, dt_limit=(0.0, 0.5))),
    ],
)
@pytest.mark.parametrize("d_per_head", [False, True])
def test_ssd_triton_options(drop, options, d_per_head):
    inputs = _inputs()
    if not options.get("dt_softplus"):
        inputs["dt"] = torch.rand_like(inputs["dt"])  # Δ used as given: keep it positive
    if d_per_head:
        inputs["D"] = inputs["D"][:, 0].contiguous()
    for name in drop:
        inputs[name] = None
    _compare(inputs, 8, FP32, **options)


@pytest.mark.parametrize("operands", ["16bit", "tf32"])
def test_ssd_triton_bf16_operands(monkeypatch, operands):
    import mambavl.ops.triton.ssd as kernels

    monkeypatch.setattr(kernels, "DOT_16BIT", operands)
    _compare(_inputs(dtype=torch.bfloat16), 16, BF16, dt_softplus=True)


def test_ssd_triton_several_tiles():
    # chunk > the 64-position tile, P > the 64-channel tile, N > the 128-state tile, last chunk partial
    inputs = _inputs(batch=1, length=150, heads=2, p=72, groups=1, n=136)
    _compare(inputs, 128, FP32, dt_softplus=True)


@pytest.mark.parametrize("chunk", [24, 48])
def test_ssd_triton_chunk_not_a_power_of_two(monkeypatch, chunk):
    import mambavl.ops.triton.ssd as kernels

    monkeypatch.setitem(kernels.TILES, "positions", 16)  # several position tiles in a chunk
    _compare(_inputs(length=37), chunk, FP32, dt_softplus=True)


def test_ssd_triton_chunking_is_invariant():
    inputs = _inputs(length=37)
    outs = [
        ops.mamba_chunk_scan_combined(
            **inputs, chunk_size=chunk, dt_softplus=True, return_final_states=True, backend="triton"
        )
        for chunk in (8, 16)
    ]
    torch.testing.assert_close(outs[0][0], outs[1][0], **FP32)
    torch.testing.assert_close(outs[0][1], outs[1][1], **FP32)


def test_ssd_triton_strided_views():
    # the layout of the models: x, B and C split off one projection, dt a slice of a wider tensor
    batch, length, heads, p, groups, n = 2, 21, 4, 6, 2, 5
    xBC = torch.randn(batch, length, heads * p + 2 * groups * n, device=DEVICE)
    x, B, C = xBC.split([heads * p, groups * n, groups * n], dim=-1)
    inputs = _inputs(batch, length, heads, p, groups, n)
    inputs |= dict(
        x=x.view(batch, length, heads, p),
        B=B.reshape(batch, length, groups, n),
        C=C.reshape(batch, length, groups, n),
        dt=torch.randn(batch, length, 2 * heads, device=DEVICE)[..., 1::2],
        initial_states=inputs["initial_states"].transpose(2, 3).contiguous().transpose(2, 3),
    )
    assert not inputs["x"].is_contiguous() and not inputs["dt"].is_contiguous()
    _compare(inputs, 8, FP32, dt_softplus=True)


def test_ssd_triton_trains_and_auto_falls_back(monkeypatch):
    """The kernels have a backward: training under an explicit triton backend (argument or MAMBAVL_BACKEND)
    runs them, never the reference's autograd; `auto` on CPU tensors stays on the reference."""
    import mambavl.ops.ssd as reference

    inputs = _inputs(length=9)
    inputs["x"].requires_grad_(True)
    want = ops.mamba_chunk_scan_combined(**inputs, chunk_size=8, backend="torch")
    (want_grad,) = torch.autograd.grad(want.sum(), inputs["x"])

    def no_reference(*args, **kwargs):
        raise AssertionError("the triton backend ran the reference")

    with monkeypatch.context() as patch:
        patch.setattr(reference, "segsum", no_reference)
        for backend, env in (("triton", "auto"), (None, "triton")):
            patch.setenv("MAMBAVL_BACKEND", env)
            y = ops.mamba_chunk_scan_combined(**inputs, chunk_size=8, backend=backend)
            assert y.grad_fn is not None
            (grad,) = torch.autograd.grad(y.sum(), inputs["x"])
            torch.testing.assert_close(y, want, **FP32)
            torch.testing.assert_close(grad, want_grad, **FP32)
    monkeypatch.setenv("MAMBAVL_BACKEND", "auto")
    y = ops.mamba_chunk_scan_combined(**inputs, chunk_size=8)
    assert (DEVICE == "cuda") == ("_ChunkScan" in type(y.grad_fn).__name__)  # auto: Triton only on CUDA
    y.sum().backward()
    assert inputs["x"].grad is not None
