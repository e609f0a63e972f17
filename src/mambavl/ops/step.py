"""One decode step of the Mamba-1 mixer between its two projections: the conv window update, x_proj,
the optional dt/B/C norms, dt_proj, the selective state update, the skip and the gate.

The reference composes the single ops exactly as the mixer's prefill path does; the Triton path
(`ops.triton.step`) runs the same math in two kernels with no intermediate rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambavl.ops.conv import causal_conv1d_update
from mambavl.ops.dispatch import backend_for, needs_grad
from mambavl.ops.norms import rms_norm
from mambavl.ops.scan import selective_state_update


def mamba1_step(
    xz: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    bcdt_norm: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, float] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y [B, D] (in xz's dtype) for one token, advancing `conv_state` [B, D, S] and `ssm_state`
    [B, D, N] in place.

    xz [B, 2D]: in_proj's output (x, then the gate z); conv_weight [D, W]; x_proj_weight [R + 2N, D];
    dt_proj_weight [D, R]; A [D, N] (negative decay rates); `bcdt_norm` = (dt, B, C weights or None,
    eps) for the RMSNorms FalconMamba and Jamba put on dt, B and C. Δ = softplus(dt_proj(dt) + bias).
    `backend`: see `ops.dispatch`. Under Triton, up to FUSED_MAX_BATCH sequences run the fused kernels
    (`ops.triton.step`), more run the single Triton ops in this sequence; the Triton path is
    forward-only (under `auto`, calls that need a gradient run the reference).
    """
    dim = conv_state.shape[1]
    if xz.dim() != 2 or xz.shape[1] != 2 * dim:
        raise ValueError(f"mamba1_step: xz must be [batch, {2 * dim}] (x and z), got {tuple(xz.shape)}")
    rank, n = dt_proj_weight.shape[1], ssm_state.shape[-1]
    if x_proj_weight.shape != (rank + 2 * n, dim):
        raise ValueError(
            f"mamba1_step: x_proj_weight must be [{rank + 2 * n}, {dim}], got {tuple(x_proj_weight.shape)}"
        )
    chosen = backend_for(xz, backend)
    if chosen == "triton":
        tensors = (xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)
        if bcdt_norm is not None:
            tensors += bcdt_norm[:3]
        grad = needs_grad(*tensors)
        if grad and backend == "triton":
            raise NotImplementedError("the Triton mamba1_step has no backward: use backend='torch'")
        from mambavl.ops.triton.step import FUSED_MAX_BATCH
        from mambavl.ops.triton.step import mamba1_step as fused

        if not grad and xz.shape[0] <= FUSED_MAX_BATCH:
            return fused(
                xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                dt_proj_bias, A, D, bcdt_norm,
            )  # fmt: skip
        # Larger batches: the single ops (Triton conv update and state update, cuBLAS projections).
        chosen = "torch" if grad else "triton"
    x, z = xz.chunk(2, dim=-1)
    x = causal_conv1d_update(x, conv_state, conv_weight, conv_bias, activation="silu", backend=chosen)
    dt, B, C = F.linear(x, x_proj_weight).split([rank, n, n], dim=-1)
    if bcdt_norm is not None:
        w_dt, w_b, w_c, eps = bcdt_norm
        dt, B, C = (rms_norm(t, w, eps, backend=chosen) for t, w in ((dt, w_dt), (B, w_b), (C, w_c)))
    dt = dt @ dt_proj_weight.T
    return selective_state_update(
        ssm_state, x, dt, A, B, C, D, z=z, dt_bias=dt_proj_bias, dt_softplus=True, backend=chosen
    )
