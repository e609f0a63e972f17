"""The [B, D, L] layouts the sequence kernels meet: a transposed view of a channel-contiguous [B, L, D]
projection (as the mixers hand x, Δ and z over), or time-contiguous. Outputs and gradients take their
input's layout, so that writes stay coalesced and nothing downstream needs a transposing copy; kernels
whose tiles want runs of consecutive steps per thread take time-contiguous copies with aligned rows."""

from __future__ import annotations

import torch


def channels_last(x: torch.Tensor) -> bool:
    """Whether [B, D, L] x is channel-contiguous."""
    return x.stride(1) == 1 and x.shape[2] > 1


def empty_like_layout(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty [B, D, L] tensor laid out as x is: channel-contiguous, or time-contiguous."""
    batch, dim, length = x.shape
    dtype = dtype or x.dtype
    if channels_last(x):
        return torch.empty(batch, length, dim, device=x.device, dtype=dtype).transpose(1, 2)
    return torch.empty(batch, dim, length, device=x.device, dtype=dtype)


def time_major(x: torch.Tensor | None) -> torch.Tensor | None:
    """[B, D, L] x time-contiguous with every row starting on a 16-element boundary (a copy unless it is so
    already, or a broadcast): Triton then gives each thread of a [channels, steps] tile a run of
    consecutive steps."""
    if x is None or not any(x.stride()):
        return x
    if x.stride(-1) == 1 and x.stride(1) % 16 == 0 and x.stride(0) % 16 == 0:
        return x
    out = empty_time_major(x)
    out.copy_(x)
    return out


def empty_time_major(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor of x's [B, D, L] shape and dtype, time-contiguous, rows on 16-element boundaries."""
    batch, dim, length = x.shape
    return torch.empty(batch, dim, -(-length // 16) * 16, device=x.device, dtype=x.dtype)[..., :length]
