"""The [B, D, L] layouts the sequence kernels meet: a transposed view of a channel-contiguous [B, L, D]
projection (as the mixers hand x, Δ and z over), or time-contiguous, either sequence-major ([B, D, L]
contiguous) or channel-major ([D, B, L] contiguous, seen as [B, D, L]: what a projection computed as W·hᵀ
gives, whose [D, B·L] matrix the next projection reads without a copy). Outputs and gradients take their
input's layout, so that writes stay coalesced and nothing downstream needs a transposing copy; kernels
whose tiles want runs of consecutive steps per thread take time-contiguous copies with aligned rows."""

from __future__ import annotations

import torch


def channels_last(x: torch.Tensor) -> bool:
    """Whether [B, D, L] x is channel-contiguous."""
    return x.stride(1) == 1 and x.shape[2] > 1


def channel_major(x: torch.Tensor) -> bool:
    """Whether time-contiguous [B, D, L] x has its channels outermost ([D, B, L] in memory)."""
    return x.stride(-1) == 1 and x.shape[0] > 1 and x.shape[1] > 1 and x.stride(0) < x.stride(1)


def empty_like_layout(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty [B, D, L] tensor laid out as x is: channel-contiguous, time-contiguous channel-major, or
    time-contiguous."""
    batch, dim, length = x.shape
    kw = dict(device=x.device, dtype=dtype or x.dtype)
    if channels_last(x):
        return torch.empty(batch, length, dim, **kw).transpose(1, 2)
    if channel_major(x):
        return torch.empty(dim, batch, length, **kw).transpose(0, 1)
    return torch.empty(batch, dim, length, **kw)


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
    """An empty tensor of x's [B, D, L] shape and dtype, time-contiguous, rows on 16-element boundaries;
    channel-major where x is."""
    batch, dim, length = x.shape
    padded = -(-length // 16) * 16
    if channel_major(x):
        return torch.empty(dim, batch, padded, device=x.device, dtype=x.dtype)[..., :length].transpose(0, 1)
    return torch.empty(batch, dim, padded, device=x.device, dtype=x.dtype)[..., :length]
