"""The Triton selective scan's backward against autograd through the PyTorch reference: gradients of every
input (and through the last state), on the GPU when there is one, else in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest), on small odd shapes whose lengths end inside a chunk, fit in one
chunk or span several (a small chunk keeps that cheap), and through a whole Mamba-1 mixer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mambavl import ops

pytest.importorskip("triton")
from mambavl.ops.triton import scan as kernel
from mambavl.ops.triton.scan import ScanTiles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
# Tolerances relative to the largest entry of each reference gradient (gradients span orders of magnitude).
FP32 = dict(rtol=1e-4, atol=1e-4)
BF16 = dict(rtol=2e-2, atol=2e-2)
# Several chunks on short sequences (the training forward carries the state and the backward the adjoint
# between them). Three copies of dB/dC, so that several programs add into each.
SMALL = ScanTiles(block_t=4, block_d=2, chunk=8, train_block_d=2, bwd_slots=3)


def _inputs(batch, dim, n, length, groups, dtype, bare=False):
    def r(*shape):
        return torch.randn(*shape, device=DEVICE)

    bc = (batch, n, length) if groups is None else (batch, groups, n, length)
    inputs = dict(
        u=r(batch, dim, length).to(dtype),
        delta=(r(batch, dim, length) * 0.5).to(dtype),
        A=-torch.rand(dim, n, device=DEVICE) * 3,
        B=r(*bc).to(dtype),
        C=r(*bc).to(dtype),
        D=r(dim),
        z=r(batch, dim, length).to(dtype),
        delta_bias=r(dim) * 0.3,
        initial_state=r(batch, dim, n),
    )
    if bare:  # no D, gate, bias or initial state; Δ as given (positive, so the state decays)
        inputs.update(D=None, z=None, delta_bias=None, initial_state=None, delta=inputs["delta"].abs())
    return inputs


def _grads(inputs, gy, gh, backend, **options):
    """(y, h_last, {name: gradient}) of <y, gy> + <h_last, gh>; gy or gh None leaves that term out."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    y, h = ops.selective_scan(
        **{k: leaves.get(k) for k in NAMES}, return_last_state=True, backend=backend, **options
    )
    loss = 0
    if gy is not None:
        loss = loss + (y.float() * gy).sum()
    if gh is not None:
        loss = loss + (h * gh).sum()
    # allow_unused: with the last state alone, C, D and z have no gradient
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves.values(), grads, strict=True)]
    return y.detach(), h.detach(), dict(zip(leaves, grads, strict=True))


def _compare(inputs, tol, softplus, y_grad=True, last_grad=True):
    batch, dim, length = inputs["u"].shape
    gy = torch.randn(batch, dim, length, device=DEVICE) if y_grad else None
    gh = torch.randn(batch, dim, inputs["A"].shape[-1], device=DEVICE) if last_grad else None
    y_ref, h_ref, ref = _grads(inputs, gy, gh, "torch", delta_softplus=softplus)
    y_tri, h_tri, tri = _grads(inputs, gy, gh, "triton", delta_softplus=softplus)
    assert y_tri.dtype == y_ref.dtype and h_tri.dtype == torch.float32
    _close("y", y_tri, y_ref, **tol)
    _close("the last state", h_tri, h_ref, **FP32)
    assert ref.keys() == tri.keys()
    for name in ref:
        want, got = ref[name], tri[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        _close(f"the gradient of {name}", got, want, **tol)


def _close(what, got, want, rtol, atol):
    """Elementwise, with atol relative to the reference's largest entry; the message names the tensor."""
    scale = max(want.float().abs().max().item(), 1e-6)
    torch.testing.assert_close(
        got.float(), want.float(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}"
    )


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """The kernel's default launch parameters, shrunk so that short sequences span several chunks."""
    monkeypatch.setattr(kernel, "DEFAULT_TILES", SMALL)


CASES = [
    (2, 7, 5, 19, None),  # odd channels and states; three chunks, the last one ragged
    (1, 10, 16, 5, 2),  # shorter than one chunk; two groups of five channels (a ragged channel block)
    (1, 12, 5, 16, 3),  # whole chunks; three groups
]


@pytest.mark.parametrize("batch,dim,n,length,groups", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bare", [False, True])
def test_selective_scan_gradients_equal_reference(batch, dim, n, length, groups, dtype, bare):
    inputs = _inputs(batch, dim, n, length, groups, dtype, bare=bare)
    tol = FP32 if dtype == torch.float32 else BF16
    # bare: no gradient into the last state either (autograd hands the backward None for it)
    _compare(inputs, tol, softplus=not bare, last_grad=not bare)


@pytest.mark.parametrize("flip", [False, True])
def test_both_ways_of_the_adjoints_scan(monkeypatch, flip):
    """The adjoint's reverse scan as Triton's reverse scan and as a forward scan over reversed inputs
    (`bwd_flip`) both give the reference's gradients: ragged last chunk, groups, every option."""
    monkeypatch.setattr(kernel, "DEFAULT_TILES", dataclasses.replace(SMALL, bwd_flip=flip))
    _compare(_inputs(2, 8, 5, 19, 2, torch.float32), FP32, softplus=True)


def test_gradient_through_the_last_state_alone():
    """Only the last state is used: no output gradient reaches the backward (None), C, D and z get zeros."""
    inputs = _inputs(2, 7, 5, 19, None, torch.float32)
    _compare(inputs, FP32, softplus=True, y_grad=False)


def test_softplus_threshold_and_large_steps():
    """Δ + bias above 20 takes the identity branch of softplus (gradient 1) in both implementations."""
    inputs = _inputs(1, 6, 4, 11, None, torch.float32)
    inputs["delta"] = inputs["delta"] + torch.where(torch.rand_like(inputs["delta"]) < 0.3, 25.0, 0.0)
    inputs["A"] = inputs["A"] * 0.01  # keep some memory across the large steps
    _compare(inputs, FP32, softplus=True)


def test_saves_inputs_and_chunk_states_only():
    """What the forward keeps for the backward: its inputs and one fp32 state per chunk, nothing of
    size L·N per channel."""
    batch, dim, n, length = 2, 7, 5, 19
    leaves = {
        k: v.requires_grad_(True) for k, v in _inputs(batch, dim, n, length, None, torch.float32).items()
    }
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.selective_scan(**leaves, delta_softplus=True, backend="triton")
    n_chunks = -(-length // SMALL.chunk)
    inputs = {v.data_ptr() for v in leaves.values()}
    extra = [t for t in saved if t.data_ptr() not in inputs]
    assert [(tuple(t.shape), t.dtype) for t in extra] == [((batch, dim, n, n_chunks), torch.float32)]


def test_environment_selects_the_kernel_and_shared_b_c_are_refused(monkeypatch):
    """MAMBAVL_BACKEND=triton trains through the kernel; B and C of shape [D, N] are refused with a clear
    error, never run by the reference behind the caller's back."""
    inputs = _inputs(1, 6, 4, 13, None, torch.float32)
    gy = torch.randn_like(inputs["u"])
    _, _, want = _grads(inputs, gy, None, "torch", delta_softplus=True)
    calls = []
    fused = kernel.selective_scan
    monkeypatch.setattr(kernel, "selective_scan", lambda *a, **k: calls.append(1) or fused(*a, **k))
    monkeypatch.setenv("MAMBAVL_BACKEND", "triton")
    _, _, got = _grads(inputs, gy, None, None, delta_softplus=True)
    assert calls, "MAMBAVL_BACKEND=triton did not run the Triton kernel"
    for name in want:
        _close(f"the gradient of {name}", got[name], want[name], **FP32)

    shared = dict(inputs, B=torch.randn(6, 4, device=DEVICE), C=torch.randn(6, 4, device=DEVICE))
    for backend in (None, "triton"):
        with pytest.raises(NotImplementedError, match=r"input-dependent B and C"):
            ops.selective_scan(**shared, backend=backend)


def test_tiles_are_checked():
    with pytest.raises(ValueError, match="power of two"):
        ScanTiles(chunk=48)
    with pytest.raises(ValueError, match="train_block_d must be a power of two"):
        ScanTiles(train_block_d=6)
    with pytest.raises(ValueError, match="at least 1"):
        ScanTiles(bwd_slots=0)
    with pytest.raises(ValueError, match="train_maxnreg"):
        ScanTiles(train_maxnreg=300)


def test_a_register_cap_changes_no_result(monkeypatch):
    """`train_maxnreg` is a launch option alone: the gradients under a cap equal the reference's."""
    monkeypatch.setattr(kernel, "DEFAULT_TILES", dataclasses.replace(SMALL, train_maxnreg=128))
    _compare(_inputs(2, 6, 4, 19, 1, torch.float32), FP32, softplus=True)


def _mixer_run(monkeypatch, backend, cfg, hidden, gout):
    from mambavl.lm.mamba1 import Mamba1Mixer

    monkeypatch.setenv("MAMBAVL_BACKEND", backend)
    torch.manual_seed(1)  # the same parameters for both backends
    mixer = Mamba1Mixer(cfg).to(DEVICE)
    x = hidden.clone().requires_grad_(True)
    out = mixer(x)
    (out * gout).sum().backward()
    return out.detach(), x.grad, {name: p.grad for name, p in mixer.named_parameters()}


def test_mamba1_mixer_trains_the_same_under_triton(monkeypatch):
    """A whole Mamba-1 mixer (in_proj, conv, x_proj, dt_proj, scan, gate, out_proj) under
    MAMBAVL_BACKEND=triton against torch: the output and every parameter's gradient."""
    from mambavl.lm.config import LMConfig

    cfg = LMConfig(family="mamba", d_model=8, n_layer=1, vocab_size=16, d_state=5)
    hidden = torch.randn(2, 13, cfg.d_model, device=DEVICE)
    gout = torch.randn(2, 13, cfg.d_model, device=DEVICE)
    out_ref, dx_ref, ref = _mixer_run(monkeypatch, "torch", cfg, hidden, gout)
    out_tri, dx_tri, tri = _mixer_run(monkeypatch, "triton", cfg, hidden, gout)
    _close("the mixer's output", out_tri, out_ref, **FP32)
    _close("the gradient of the mixer's input", dx_tri, dx_ref, **FP32)
    assert ref.keys() == tri.keys()
    for name in ref:
        assert tri[name] is not None, name
        _close(f"the gradient of {name}", tri[name], ref[name], **FP32)


@pytest.mark.slow
@pytest.mark.parametrize(("groups", "dtype"), [(None, torch.bfloat16), (2, torch.float32)])
def test_selective_scan_gradients_default_tiles(monkeypatch, dtype, groups):
    """The launch parameters the GPU runs (`ScanTiles()`): two chunks of the default length, the last one
    ragged; without groups, three programs of the default channels each; with groups, 5 channels a group,
    so the training programs shrink to one channel."""
    tiles = ScanTiles()
    monkeypatch.setattr(kernel, "DEFAULT_TILES", tiles)
    inputs = _inputs(1, 12 if groups is None else 5 * groups, 16, tiles.chunk + 37, groups, dtype)
    _compare(inputs, FP32 if dtype == torch.float32 else BF16, softplus=True)


@pytest.mark.parametrize("groups", [None, 2])
def test_training_and_prefill_forwards_agree(groups):
    """The two forward kernels, the one training runs (it keeps the chunk states) and the prefill one (no
    gradient), give the same output and last state."""
    inputs = _inputs(2, 10, 5, 19, groups, torch.float32)
    options = dict(delta_softplus=True, return_last_state=True, backend="triton")
    with torch.no_grad():
        y_prefill, h_prefill = ops.selective_scan(**inputs, **options)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y_train, h_train = ops.selective_scan(**leaves, **options)
    _close("y", y_train.detach(), y_prefill, **FP32)
    _close("the last state", h_train.detach(), h_prefill, **FP32)
