"""The math of the models, each op with the signature of its mamba_ssm / causal_conv1d counterpart.

These are the pure-PyTorch references; models call them only through this module, so a fast kernel
can take a name's place without touching the models.
"""

from mambavl.ops.conv import causal_conv1d_fn, causal_conv1d_update
from mambavl.ops.inner import mamba1_inner, mamba1_mixer, mamba2_inner
from mambavl.ops.linear import linear
from mambavl.ops.norms import rms_norm, rms_norm_gated
from mambavl.ops.scan import linear_scan, selective_scan, selective_state_update
from mambavl.ops.ssd import mamba_chunk_scan_combined
from mambavl.ops.step import mamba1_step
from mambavl.ops.timestep import NO_LIMIT, timestep

__all__ = [
    "NO_LIMIT",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "linear",
    "linear_scan",
    "mamba1_inner",
    "mamba1_mixer",
    "mamba1_step",
    "mamba2_inner",
    "mamba_chunk_scan_combined",
    "rms_norm",
    "rms_norm_gated",
    "selective_scan",
    "selective_state_update",
    "timestep",
]
