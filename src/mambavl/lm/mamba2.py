"""The Mamba-2 mixer (mamba_ssm `Mamba2`, HF `Mamba2Mixer`): SSD over heads and groups, then a gated,
grouped RMSNorm. One `forward` serves prefill (chunked scan) and decode (state update)."""

from __future__ import annotations

import torch
from torch import nn

from mambavl import ops
from mambavl.lm.config import LMConfig
from mambavl.lm.linear import Linear, plain
from mambavl.lm.mamba1 import conv_step, decay_rates, depthwise_conv
from mambavl.lm.norm import GatedRMSNorm


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        d, n, g, h = cfg.d_inner, cfg.d_state, cfg.ngroups, cfg.nheads
        self.d_inner, self.d_state, self.ngroups, self.nheads, self.headdim = d, n, g, h, cfg.headdim
        self.d_conv, self.chunk_size, self.dt_limit = cfg.d_conv, cfg.chunk_size, cfg.dt_limit
        self.conv_dim = d + 2 * g * n
        self.in_proj = Linear(cfg.d_model, d + self.conv_dim + h, bias=cfg.proj_bias)
        self.conv1d = depthwise_conv(self.conv_dim, cfg)
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(d if cfg.d_has_hdim else h))
        self.norm = (
            GatedRMSNorm(d, d // g, cfg.gated_norm_eps, cfg.norm_before_gate) if cfg.gated_norm else None
        )
        self.out_proj = Linear(d, cfg.d_model, bias=cfg.proj_bias)

    def new_state(self, batch: int, device=None) -> dict[str, torch.Tensor]:
        f32 = dict(dtype=torch.float32, device=device)
        return {
            "conv": torch.zeros(batch, self.conv_dim, self.d_conv, **f32),
            "ssm": torch.zeros(batch, self.nheads, self.headdim, self.d_state, **f32),
        }

    def forward(
        self,
        hidden: torch.Tensor,
        state: dict[str, torch.Tensor] | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, T, _ = hidden.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        zxbcdt = self.in_proj(hidden)
        if state is None and valid is None and self.norm is not None and plain(self.out_proj):  # from zeros
            norm = self.norm
            return ops.mamba2_inner(
                zxbcdt, self.conv1d.weight[:, 0], self.conv1d.bias, self.dt_bias, decay_rates(self), self.D,
                norm.weight, self.out_proj.weight, self.out_proj.bias, p, g, n, self.chunk_size, norm.eps,
                norm.group_size, norm.norm_before_gate, self.dt_limit,
            )  # fmt: skip
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, h], dim=-1)
        xBC = conv_step(xBC.transpose(1, 2), self.conv1d, state, valid).transpose(1, 2)
        dt_bias, softplus, limit = self.dt_bias, True, self.dt_limit
        if valid is not None:  # padding: Δ = 0 is an exact identity step (decay 1, no input)
            dt = ops.timestep(dt, dt_bias, True, self.dt_limit) * valid[..., None]
            dt_bias, softplus, limit = None, False, ops.NO_LIMIT
        x, B, C = xBC.split([self.d_inner, g * n, g * n], dim=-1)
        A = decay_rates(self)
        D = self.D.view(h, p) if self.D.numel() == self.d_inner else self.D
        # Without the gated norm, mamba_ssm gates inside the scan instead.
        z_scan = None if self.norm is not None else z
        if state is not None and T == 1:
            y = ops.selective_state_update(
                state["ssm"],
                x.view(batch, h, p),
                dt[:, 0, :, None].expand(batch, h, p),
                A[:, None, None].expand(h, p, n),
                B.view(batch, g, n),
                C.view(batch, g, n),
                D if D.dim() == 2 else D[:, None].expand(h, p),
                z=None if z_scan is None else z_scan.view(batch, h, p),
                dt_bias=None if dt_bias is None else dt_bias[:, None].expand(h, p),
                dt_softplus=softplus,
                dt_limit=limit,
            )
        else:
            out = ops.mamba_chunk_scan_combined(
                x.view(batch, T, h, p),
                dt,
                A,
                B.view(batch, T, g, n),
                C.view(batch, T, g, n),
                self.chunk_size,
                D=D,
                z=None if z_scan is None else z_scan.view(batch, T, h, p),
                dt_bias=dt_bias,
                dt_softplus=softplus,
                dt_limit=limit,
                initial_states=None if state is None else state["ssm"],
                return_final_states=state is not None,
            )
            if state is not None:
                y, final = out
                state["ssm"].copy_(final)
            else:
                y = out
        y = y.reshape(batch, T, self.d_inner)
        if self.norm is not None:
            y = self.norm(y, z)
        return self.out_proj(y)
