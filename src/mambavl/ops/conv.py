"""Causal depthwise conv1d over a sequence and its one-step update (the causal_conv1d package's API).

Computed in fp32 and returned in the input's dtype, as the CUDA kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambavl.ops.dispatch import backend_for


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation in ("silu", "swish"):
        return F.silu(y)
    if activation is None:
        return y
    raise ValueError(f"causal_conv1d: unsupported activation {activation!r}; expected 'silu' or None")


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
    backend: str | None = None,
):
    """x: [B, D, L]; weight: [D, W]; initial_states: [B, D, W-1] (the inputs before x, zeros if None).

    Returns y [B, D, L] and, with `return_final_states`, the last W-1 inputs [B, D, W-1] (fp32).
    `backend`: see `ops.dispatch`; the Triton kernels have a backward (x, weight, bias, initial_states,
    and through the final states), and their y takes x's memory layout.
    """
    if backend_for(x, backend) == "triton":
        from mambavl.ops.triton.conv import causal_conv1d_fn as fused

        return fused(x, weight, bias, initial_states, return_final_states, activation)
    batch, dim, _ = x.shape
    width = weight.shape[-1]
    if initial_states is None:
        initial_states = x.new_zeros(batch, dim, width - 1, dtype=torch.float32)
    xc = torch.cat([initial_states.float(), x.float()], dim=-1)
    y = F.conv1d(xc, weight.float()[:, None], bias.float() if bias is not None else None, groups=dim)
    y = _activate(y, activation).to(x.dtype)
    if return_final_states:
        return y, xc[:, :, xc.shape[-1] - (width - 1) :]
    return y


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode step(s): x [B, D] or [B, D, L]; conv_state [B, D, S] with S >= W-1 holds the last S
    inputs and is shifted in place. Returns y shaped like x. `backend`: see `ops.dispatch`."""
    if backend_for(x, backend) == "triton":
        from mambavl.ops.triton.conv import causal_conv1d_update as fused

        return fused(x, conv_state, weight, bias, activation)
    squeeze = x.dim() == 2
    if squeeze:
        x = x[:, :, None]
    dim, width = weight.shape
    state_len = conv_state.shape[-1]
    xc = torch.cat([conv_state.float(), x.float()], dim=-1)
    conv_state.copy_(xc[:, :, -state_len:])
    xc = xc[:, :, xc.shape[-1] - (width - 1 + x.shape[-1]) :]
    y = F.conv1d(xc, weight.float()[:, None], bias.float() if bias is not None else None, groups=dim)
    y = _activate(y, activation).to(x.dtype)
    return y[:, :, 0] if squeeze else y
