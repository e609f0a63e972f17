"""The Mamba-1 mixer (mamba_ssm `Mamba`, HF `MambaMixer`), with the optional RMSNorms on dt, B and C
that FalconMamba (weight-free) and Jamba (with weights) add. One `forward` serves prefill and decode."""

from __future__ import annotations

import torch
from torch import nn

from mambavl import ops
from mambavl.lm.config import LMConfig
from mambavl.lm.linear import Linear, plain
from mambavl.lm.norm import RMSNorm


class Mamba1Mixer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        d, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = d, n, r, cfg.d_conv
        self.in_proj = Linear(cfg.d_model, 2 * d, bias=cfg.proj_bias)
        self.conv1d = depthwise_conv(d, cfg)
        self.x_proj = Linear(d, r + 2 * n, bias=False)
        self.dt_proj = Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = Linear(d, cfg.d_model, bias=cfg.proj_bias)
        if cfg.bcdt_norm is not None:
            weighted = cfg.bcdt_norm == "weighted"
            self.dt_layernorm = RMSNorm(r, cfg.bcdt_eps, weight=weighted)
            self.b_layernorm = RMSNorm(n, cfg.bcdt_eps, weight=weighted)
            self.c_layernorm = RMSNorm(n, cfg.bcdt_eps, weight=weighted)
        self.bcdt_norm = cfg.bcdt_norm is not None

    def new_state(self, batch: int, device=None) -> dict[str, torch.Tensor]:
        f32 = dict(dtype=torch.float32, device=device)
        return {
            "conv": torch.zeros(batch, self.d_inner, self.d_conv, **f32),
            "ssm": torch.zeros(batch, self.d_inner, self.d_state, **f32),
        }

    def forward(
        self,
        hidden: torch.Tensor,
        state: dict[str, torch.Tensor] | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T = hidden.shape[1]
        if state is not None and T == 1 and valid is None:  # a decode step: one fused op
            return self.out_proj(self.step(self.in_proj(hidden)[:, 0], state)[:, None])
        projections = (self.in_proj, self.x_proj, self.dt_proj, self.out_proj)
        if state is None and valid is None and not self.bcdt_norm and plain(*projections):  # from zeros
            return ops.mamba1_mixer(
                hidden, self.in_proj.weight, self.in_proj.bias, self.conv1d.weight[:, 0], self.conv1d.bias,
                self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias, decay_rates(self), self.D,
                self.out_proj.weight, self.out_proj.bias, self.dt_rank, self.d_state,
            )  # fmt: skip
        # [B, D, T] views of [B, T, D] halves: split on the last axis, so that the backward joins their
        # (channel-contiguous) gradients into in_proj's layout with one concatenation and no transpose
        x, z = (half.transpose(1, 2) for half in self.in_proj(hidden).chunk(2, dim=-1))
        x = conv_step(x, self.conv1d, state, valid)

        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.bcdt_norm:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        dt = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # bias added inside the scan, in fp32
        dt_bias, softplus = self.dt_proj.bias, True
        if valid is not None:  # padding: Δ = 0 is an exact identity step (decay 1, no input)
            dt = ops.timestep(dt, dt_bias[:, None], True) * valid[:, None, :]
            dt_bias, softplus = None, False
        A = decay_rates(self)
        kw = dict(D=self.D, delta_bias=dt_bias, delta_softplus=softplus)
        if state is None:
            y = ops.selective_scan(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), z=z, **kw)
        elif T == 1:
            y = ops.selective_state_update(
                state["ssm"],
                x[..., 0],
                dt[..., 0],
                A,
                B[:, 0],
                C[:, 0],
                self.D,
                z=z[..., 0],
                dt_bias=dt_bias,
                dt_softplus=softplus,
            )[..., None]
        else:
            y, last = ops.selective_scan(
                x,
                dt,
                A,
                B.transpose(1, 2),
                C.transpose(1, 2),
                z=z,
                return_last_state=True,
                initial_state=state["ssm"],
                **kw,
            )
            state["ssm"].copy_(last)
        return self.out_proj(y.transpose(1, 2))

    def step(self, xz: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """y [B, D] for one token from in_proj's output xz [B, 2D], advancing the state in place."""
        norms = None
        if self.bcdt_norm:
            norms = (self.dt_layernorm.weight, self.b_layernorm.weight, self.c_layernorm.weight)
            norms += (self.dt_layernorm.eps,)
        return ops.mamba1_step(
            xz,
            state["conv"],
            state["ssm"],
            self.conv1d.weight[:, 0],
            self.conv1d.bias,
            self.x_proj.weight,
            self.dt_proj.weight,
            self.dt_proj.bias,
            decay_rates(self),
            self.D,
            norms,
        )


def decay_rates(mixer: nn.Module) -> torch.Tensor:
    """A = -exp(A_log) in fp32. Without autograd it is computed once per version of A_log (so a decode
    step or a captured graph does not spend three kernels on it), and recomputed after any update."""
    if torch.is_grad_enabled() and mixer.A_log.requires_grad:
        return -torch.exp(mixer.A_log.float())
    key = (mixer.A_log.data_ptr(), mixer.A_log._version, mixer.A_log.dtype, torch.is_inference_mode_enabled())
    cached = mixer.__dict__.get("_decay_rates")
    if cached is None or cached[0] != key:
        cached = (key, -torch.exp(mixer.A_log.detach().float()))
        mixer.__dict__["_decay_rates"] = cached
    return cached[1]


def depthwise_conv(channels: int, cfg: LMConfig) -> nn.Conv1d:
    """The mixers' causal depthwise conv (weights [C, 1, d_conv]; run through `conv_step`)."""
    return nn.Conv1d(
        channels, channels, cfg.d_conv, groups=channels, bias=cfg.conv_bias, padding=cfg.d_conv - 1
    )


def conv_step(
    x: torch.Tensor, conv: nn.Conv1d, state: dict[str, torch.Tensor] | None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal depthwise conv + silu over x [B, C, T], continuing from and advancing state["conv"].

    With `valid` [B, T] (right padding), each row's window ends at its last real input.
    """
    weight = conv.weight[:, 0]
    if state is None:
        return ops.causal_conv1d_fn(x, weight, conv.bias, activation="silu")
    window = state["conv"]
    if x.shape[-1] == 1 and valid is None:
        return ops.causal_conv1d_update(x, window, weight, conv.bias, activation="silu")
    y = ops.causal_conv1d_fn(
        x,
        weight,
        conv.bias,
        initial_states=window[:, :, window.shape[-1] - (weight.shape[-1] - 1) :],
        activation="silu",
    )
    # The new window: the S inputs ending at each row's last real token (the whole chunk, unless padded),
    # taken from x where they fall inside it and from the old window before it. Only S columns are read.
    width, T = window.shape[-1], x.shape[-1]
    ends = torch.full((x.shape[0],), T, device=x.device) if valid is None else valid.sum(-1)
    pos = (ends[:, None] + torch.arange(-width, 0, device=x.device))[:, None, :].expand(-1, x.shape[1], -1)
    from_x = x.gather(2, pos.clamp(min=0)).float()
    from_window = window.gather(2, (pos + width).clamp(max=width - 1))
    window.copy_(torch.where(pos >= 0, from_x, from_window))
    return y
