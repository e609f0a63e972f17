"""AdamW's update and the gradients' squared norm over a whole list of fp32 tensors, each in one launch.

AdamW is bandwidth-bound: per parameter it reads the weight, its gradient and both moments and writes three
of them back (28 bytes). One launch covers every tensor: the tensors' addresses (as element offsets from
one base pointer, so that the compiler knows their 16-byte alignment and moves whole blocks as 128-bit
vectors) and their hyperparameters sit in small device tables, and each program takes one block of one
tensor, found through a block table that is built once for a list of tensor sizes.

The update is torch.optim.AdamW's (not amsgrad, not maximize), in fp32:
    g ← g / grad_scale;  p ← p·(1 − lr·wd);  m ← m + (1 − β1)(g − m);  v ← β2·v + (1 − β2)·g²
    p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mambavl.runtime import to_device

BLOCK = 4096  # elements a program
WARPS = 8
HYPER = 6  # per tensor: 1 − lr·wd, lr / (1 − β1^t), √(1 − β2^t), 1 − β1, β2, ε


@triton.jit
def _address(base, table, row, column: tl.constexpr, COLUMNS: tl.constexpr):
    """The tensor in the address table's row `row`, column `column`: `base` plus the table's offset in
    elements, a multiple of four (every address is 16-byte aligned: checked by the host), so that loads
    and stores go as vectors."""
    return base + tl.multiple_of(tl.load(table + row * COLUMNS + column), 4)


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _store(ptrs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, x, mask=mask)
    else:
        tl.store(ptrs, x)


@triton.jit
def _adamw_block(
    p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, hyper, scale, HAS_SCALE: tl.constexpr, MASKED: tl.constexpr
):
    """The update of one block; without MASKED a whole one (its loads and stores then go as vectors: a
    mask whose bound is read from memory would split them into single elements)."""
    lr_decay, step_size, bc2_sqrt = tl.load(hyper), tl.load(hyper + 1), tl.load(hyper + 2)
    one_minus_beta1, beta2, eps = tl.load(hyper + 3), tl.load(hyper + 4), tl.load(hyper + 5)
    g = _load(g_ptr + offs, mask, MASKED)
    p = _load(p_ptr + offs, mask, MASKED)
    m = _load(m_ptr + offs, mask, MASKED)
    v = _load(v_ptr + offs, mask, MASKED)
    if HAS_SCALE:
        g = g / tl.load(scale)
    p = p * lr_decay
    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    _store(p_ptr + offs, p, mask, MASKED)
    _store(m_ptr + offs, m, mask, MASKED)
    _store(v_ptr + offs, v, mask, MASKED)


@triton.jit
def _adamw_kernel(
    base, addresses, hyper, block_tensor, block_start, sizes, grad_scale,
    HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, HYPER: tl.constexpr,
):  # fmt: skip
    # addresses [T, 4] int64: each tensor's parameter, gradient, exp_avg and exp_avg_sq, as offsets from
    # `base` in fp32 elements; hyper [T, HYPER]
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    size = tl.load(sizes + tensor)
    p_ptr = _address(base, addresses, tensor, 0, 4)
    g_ptr = _address(base, addresses, tensor, 1, 4)
    m_ptr = _address(base, addresses, tensor, 2, 4)
    v_ptr = _address(base, addresses, tensor, 3, 4)
    row = hyper + tensor * HYPER
    mask = offs < size
    if start + BLOCK <= size:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, row, grad_scale, HAS_SCALE, False)
    else:  # a tensor's last block
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, row, grad_scale, HAS_SCALE, True)


@triton.jit
def _sum_squares_kernel(base, addresses, block_tensor, block_start, sizes, out, BLOCK: tl.constexpr):
    # addresses [T, 1] int64 (offsets from `base`); out [blocks] fp32: each block's Σ x² (the host sums
    # them, in a fixed order)
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    x_ptr = _address(base, addresses, tensor, 0, 1)
    size = tl.load(sizes + tensor)
    if start + BLOCK <= size:
        x = _load(x_ptr + offs, offs < size, False)  # a whole block, loaded as vectors
    else:
        x = _load(x_ptr + offs, offs < size, True)
    tl.store(out + pid, tl.sum(x * x, 0))


@dataclass(frozen=True)
class Blocks:
    """The block table of a list of tensor sizes: program i takes block `start[i]` of tensor `tensor[i]`."""

    tensor: torch.Tensor  # [blocks] int32
    start: torch.Tensor  # [blocks] int32
    sizes: torch.Tensor  # [T] int64

    @classmethod
    def of(cls, sizes: list[int], device) -> Blocks:
        counts = torch.tensor([-(-n // BLOCK) for n in sizes], dtype=torch.int64)
        tensor = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), counts)
        first = torch.cumsum(counts, 0) - counts
        start = torch.arange(len(tensor), dtype=torch.int64) - torch.repeat_interleave(first, counts)
        return cls(
            tensor.to(device),
            start.to(torch.int32).to(device),
            torch.tensor(sizes, dtype=torch.int64, device=device),
        )

    @property
    def count(self) -> int:
        return self.tensor.numel()


def addresses(base: torch.Tensor, *columns: list[torch.Tensor], device) -> torch.Tensor:
    """[T, len(columns)] int64 device table of the tensors' addresses as offsets from `base` in fp32
    elements (copied from pinned host memory, without waiting)."""
    origin = base.data_ptr()
    rows = [[(t.data_ptr() - origin) // 4 for t in row] for row in zip(*columns, strict=True)]
    return to_device(rows, device)


def check_tensors(*tensors: torch.Tensor) -> str | None:
    """Why these tensors cannot go through the kernels (None if they can): fp32, contiguous, on one device,
    16-byte aligned."""
    device = tensors[0].device
    for t in tensors:
        if hasattr(t, "full_tensor"):
            return "a sharded (DTensor) tensor"
        if t.dtype != torch.float32:
            return f"a {t.dtype} tensor (the kernels take fp32)"
        if t.device != device:
            return "tensors on several devices"
        if not t.is_contiguous() or t.layout != torch.strided or t.is_sparse:
            return "a non-contiguous or sparse tensor"
        if t.data_ptr() % 16:
            return "a tensor not aligned to 16 bytes"
    return None


def adamw_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    hyper: torch.Tensor,
    blocks: Blocks,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """One AdamW step over every tensor, in place, in one launch. `hyper` [T, HYPER] fp32 on the device (per
    tensor 1 − lr·wd, lr / (1 − β1^t), √(1 − β2^t), 1 − β1, β2, ε); `grad_scale`: a device scalar the
    gradients are divided by (None: 1)."""
    device = params[0].device
    table = addresses(params[0], params, grads, exp_avgs, exp_avg_sqs, device=device)
    scale = grad_scale if grad_scale is not None else hyper
    _adamw_kernel[(blocks.count,)](
        params[0], table, hyper, blocks.tensor, blocks.start, blocks.sizes, scale,
        HAS_SCALE=grad_scale is not None, BLOCK=BLOCK, HYPER=HYPER, num_warps=WARPS,
    )  # fmt: skip


def sum_squares(tensors: list[torch.Tensor], blocks: Blocks) -> torch.Tensor:
    """Σ x² over every element of every tensor, an fp32 device scalar (a fixed order of summation: the
    same inputs give the same bits)."""
    device = tensors[0].device
    table = addresses(tensors[0], tensors, device=device)
    partial = torch.empty(blocks.count, device=device, dtype=torch.float32)
    _sum_squares_kernel[(blocks.count,)](
        tensors[0], table, blocks.tensor, blocks.start, blocks.sizes, partial, BLOCK=BLOCK, num_warps=WARPS
    )
    return partial.sum()
