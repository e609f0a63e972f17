"""y = x · Wᵀ (+ bias) for few rows of x: the decode projections, where the whole weight is read to
produce a handful of outputs and the speed is the speed of streaming W from memory.

Each program owns BLOCK_N output columns for every row and walks K in BLOCK_K steps, the W tile
feeding a tensor-core dot with the rows padded to BLOCK_M (at most 16 rows are ever in flight, so the
padding costs no memory traffic). Accumulation is in fp32; the output is rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambavl.ops.dispatch import interpreting

# (BLOCK_N, BLOCK_K, num_warps, num_stages) by output width, the fastest of `mambavl bench --kernels
# --sweep` on an H200 for cobra+3b's out_proj, in_proj and LM head.
TILES = {"narrow": (32, 512, 4, 4), "mid": (32, 128, 4, 4), "wide": (64, 128, 4, 4)}


def tile_class(n: int) -> str:
    return "narrow" if n <= 4096 else "mid" if n <= 16384 else "wide"


MAX_ROWS = 16


@triton.jit
def _skinny_kernel(
    x, w, bias, out, M, N, K,
    x_m, x_k, w_n, w_k, o_m, o_n,
    HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    mn, mm = n < N, m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < K
        xt = tl.load(x + m[:, None] * x_m + k[None, :] * x_k, mask=mm[:, None] & mk[None, :], other=0.0)
        wt = tl.load(w + n[None, :] * w_n + k[:, None] * w_k, mask=mk[:, None] & mn[None, :], other=0.0)
        if F32_DOT:  # the interpreter's 16-bit products are wrong: widen first
            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)
    if HAS_BIAS:
        acc += tl.load(bias + n, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out + m[:, None] * o_m + n[None, :] * o_n,
        acc.to(out.dtype.element_ty),
        mask=mm[:, None] & mn[None, :],
    )


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for x [..., K] with at most MAX_ROWS rows, x and weight in the same 16-bit dtype."""
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"skinny_linear takes bf16 or fp16 x and weight of one dtype, got {x.dtype}, {weight.dtype}"
        )
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"skinny_linear: x has {K} features but the weight takes {weight.shape[1]}")
    rows = x.reshape(-1, K)
    M = rows.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {M}: use F.linear")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = TILES[tile_class(N)]
    _skinny_kernel[(triton.cdiv(N, block_n),)](
        rows, weight, bias if bias is not None else weight, out, M, N, K,
        *rows.stride(), *weight.stride(), *out.stride(),
        HAS_BIAS=bias is not None, F32_DOT=interpreting(), BLOCK_M=16, BLOCK_N=block_n,
        BLOCK_K=min(block_k, max(16, triton.next_power_of_2(K))),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out.view(*x.shape[:-1], N)
