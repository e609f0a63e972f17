"""TritonAdamW (one launch for every tensor's update and one for the gradients' norm) against torch's AdamW:
the same parameters and state after several steps, with two parameter groups, a changing learning rate,
a parameter without a gradient, a clip divisor, and state dicts that move between the two. On the GPU
when there is one, else in Triton's interpreter."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from mambavl.ops.triton import adamw as kernels
from mambavl.train.adamw import TritonAdamW

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # sizes across the kernel's blocks: one element, a ragged block, more than one block, a matrix
    shapes = [(1,), (3,), (kernels.BLOCK + 5,), (37, 29)]
    return [torch.randn(*s, generator=gen).to(DEVICE).requires_grad_() for s in shapes]


def _groups(params):
    return [
        {"params": params[2:], "weight_decay": 0.1},
        {"params": params[:2], "weight_decay": 0.0, "betas": (0.8, 0.95)},
    ]


def _grads(params, step, seed=1):
    gen = torch.Generator().manual_seed(seed + step)
    for i, p in enumerate(params):
        if step == 1 and i == 1:  # no gradient this step: neither optimizer touches it or its step count
            p.grad = None
        else:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE) * (i + 1)


def _run(opt_class, steps=4, scale_at=2, **kw):
    params = _params()
    opt = opt_class(_groups(params), lr=1e-2, eps=1e-6, **kw)
    for step in range(steps):
        _grads(params, step)
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (0.7**step)  # as a scheduler would
        if step == scale_at:
            scale = torch.tensor(3.0, device=DEVICE)
            if isinstance(opt, TritonAdamW):
                opt.grad_scale = scale
            else:
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(scale)
        opt.step()
        if isinstance(opt, TritonAdamW):
            opt.grad_scale = None
    return params, opt


def _assert_same(a_params, a_opt, b_params, b_opt):
    # fp32 rounding apart (the kernel fuses multiplies and adds that torch's step rounds one by one)
    tol = dict(rtol=1e-5, atol=1e-6)
    for pa, pb in zip(a_params, b_params, strict=True):
        torch.testing.assert_close(pa, pb, **tol)
        sa, sb = a_opt.state[pa], b_opt.state[pb]
        assert float(sa["step"]) == float(sb["step"])
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], **tol)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], **tol)


def test_steps_equal_torch_adamw():
    ours = _run(TritonAdamW)
    ref = _run(torch.optim.AdamW, foreach=False)
    _assert_same(*ours, *ref)
    assert float(ours[1].state[ours[0][1]]["step"]) == 3  # the step without a gradient was skipped


def test_grad_norm_equals_the_total_norm():
    params = _params()
    _grads(params, 0)
    opt = TritonAdamW(_groups(params))
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    torch.testing.assert_close(opt.grad_norm(), total, rtol=1e-6, atol=0)
    assert opt.grad_norm().item() == opt.grad_norm().item()  # a fixed order: the same bits every time


def test_state_dicts_move_between_the_two():
    """A run saved by TritonAdamW continues in torch's AdamW (and back) exactly as it would have."""
    params, ours = _run(TritonAdamW, steps=2, scale_at=-1)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.AdamW(_groups(ref_params), lr=1e-2, eps=1e-6, foreach=False)
    ref.load_state_dict(copy.deepcopy(ours.state_dict()))  # as through a file: nothing shared
    back = TritonAdamW(_groups(params), lr=1e-2, eps=1e-6)
    back.load_state_dict(copy.deepcopy(ref.state_dict()))
    for step in (2, 3):
        _grads(params, step)
        _grads(ref_params, step)
        back.step()
        ref.step()
    _assert_same(params, back, ref_params, ref)


def test_what_the_kernels_cannot_take_runs_torchs_step():
    """A bf16 parameter or amsgrad: torch's own step, with the clip divisor applied to the gradients."""
    for kw, dtype in ((dict(), torch.bfloat16), (dict(amsgrad=True), torch.float32)):
        results = []
        for cls in (TritonAdamW, torch.optim.AdamW):
            p = torch.linspace(-1, 1, 10, device=DEVICE).to(dtype).requires_grad_()
            opt = cls([p], lr=0.1)
            if kw:
                opt.param_groups[0].update(kw)
            p.grad = torch.linspace(1, 2, 10, device=DEVICE).to(dtype)
            if cls is TritonAdamW:
                opt.grad_scale = torch.tensor(2.0, device=DEVICE)
            else:
                p.grad.div_(2.0)
            opt.step()
            results.append(p.detach().float())
        torch.testing.assert_close(results[0], results[1])


def test_blocks_cover_every_element_once():
    sizes = [1, kernels.BLOCK, kernels.BLOCK + 1, 7]
    blocks = kernels.Blocks.of(sizes, "cpu")
    pairs = list(zip(blocks.tensor.tolist(), blocks.start.tolist(), strict=True))
    assert pairs == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]
    assert blocks.sizes.tolist() == sizes


def test_torchs_own_kernel_options_are_refused():
    with pytest.raises(ValueError, match="own kernels"):
        TritonAdamW(_params(), fused=True)
    opt = TritonAdamW(_params(), amsgrad=True)  # AdamW's other options are kept (and take torch's step)
    assert opt.param_groups[0]["amsgrad"] and not opt.param_groups[0]["foreach"]


def test_the_run_chooses_its_adamw_kernels():
    """`TrainConfig.adamw_kernels`: on GPUs what it names (torch's fused AdamW by default), torch's AdamW
    on CPUs whatever is asked; anything else is refused."""
    from types import SimpleNamespace

    from mambavl.train.config import TrainConfig
    from mambavl.train.recipe import adamw_kernels

    gpu = SimpleNamespace(is_cuda=True)  # adamw_kernels reads only where the parameters are
    assert TrainConfig(model="tiny-cobra", run_dir=Path("run")).adamw_kernels == "torch"
    for choice in ("torch", "triton"):
        assert adamw_kernels(SimpleNamespace(adamw_kernels=choice), torch.zeros(1)) == "torch"
        assert adamw_kernels(SimpleNamespace(adamw_kernels=choice), gpu) == choice
    with pytest.raises(ValueError, match="adamw_kernels"):
        TrainConfig(model="tiny-cobra", run_dir=Path("run"), adamw_kernels="apex").resolved()
