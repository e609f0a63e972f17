"""One explicit configuration for every language model mambavl runs: Mamba-1, FalconMamba, Mamba-2
and the Jamba hybrid differ only in the values of these fields (which mixer each layer has, which
feed-forward, which inner norms), never in code paths chosen by family name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIXERS = ("mamba1", "mamba2", "attention")
FFNS = ("none", "mlp", "moe")
BCDT_NORMS = (None, "weightless", "weighted")


@dataclass(frozen=True)
class LMConfig:
    family: str  # mamba | falcon_mamba | mamba2 | jamba: the checkpoint family, for naming only
    d_model: int
    n_layer: int
    vocab_size: int  # rows of the embedding, already padded
    mixers: tuple[str, ...] = ()  # per layer, from MIXERS; empty = all `default_mixer`
    ffns: tuple[str, ...] = ()  # per layer, from FFNS; empty = all "none"
    default_mixer: str = "mamba1"
    # Mamba (both generations)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    d_inner: int = 0  # 0 = expand * d_model
    conv_bias: bool = True
    proj_bias: bool = False
    # Mamba-1
    dt_rank: int = 0  # 0 = ceil(d_model / 16)
    bcdt_norm: str | None = None  # RMSNorm on dt, B, C: FalconMamba weight-free, Jamba with weights
    bcdt_eps: float = 1e-6
    # Mamba-2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_limit: tuple[float, float] = (0.0, math.inf)
    d_has_hdim: bool = False  # D per channel instead of per head
    gated_norm: bool = True  # gated RMSNorm on y (else y * silu(z))
    norm_before_gate: bool = False
    gated_norm_eps: float = 1e-5
    # attention and feed-forward (Jamba)
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0  # 0 = d_model / n_heads
    d_ffn: int = 0
    n_experts: int = 1
    top_k: int = 2
    # blocks
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    extra: dict = field(default_factory=dict, compare=False)  # the source config, kept for reference

    def __post_init__(self):
        def fix(name, value):
            object.__setattr__(self, name, value)

        if not self.d_inner:
            fix("d_inner", self.expand * self.d_model)
        if not self.dt_rank:
            fix("dt_rank", math.ceil(self.d_model / 16))
        if not self.mixers:
            fix("mixers", (self.default_mixer,) * self.n_layer)
        if not self.ffns:
            fix("ffns", ("none",) * self.n_layer)
        fix("mixers", tuple(self.mixers))
        fix("ffns", tuple(self.ffns))
        fix("dt_limit", tuple(float(v) for v in self.dt_limit))
        if "attention" in self.mixers and not self.head_dim:
            fix("head_dim", self.d_model // max(self.n_heads, 1))
        self.validate()

    def validate(self) -> None:
        problems = []
        if len(self.mixers) != self.n_layer or len(self.ffns) != self.n_layer:
            problems.append(f"mixers/ffns must list {self.n_layer} layers")
        if bad := set(self.mixers) - set(MIXERS):
            problems.append(f"unknown mixer(s) {sorted(bad)}; expected {MIXERS}")
        if bad := set(self.ffns) - set(FFNS):
            problems.append(f"unknown ffn(s) {sorted(bad)}; expected {FFNS}")
        if self.bcdt_norm not in BCDT_NORMS:
            problems.append(f"bcdt_norm={self.bcdt_norm!r}; expected one of {BCDT_NORMS}")
        if "mamba2" in self.mixers:
            if self.d_inner % self.headdim:
                problems.append(f"d_inner {self.d_inner} is not a multiple of headdim {self.headdim}")
            elif self.nheads % self.ngroups:
                problems.append(f"ngroups {self.ngroups} does not divide {self.nheads} heads")
            if self.d_inner % self.ngroups:
                problems.append(f"ngroups {self.ngroups} does not divide d_inner {self.d_inner}")
        heads_ok = self.n_heads > 0 and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0
        if "attention" in self.mixers and not heads_ok:
            problems.append(
                f"attention needs n_heads ({self.n_heads}) a multiple of n_kv_heads ({self.n_kv_heads}) > 0"
            )
        if any(f != "none" for f in self.ffns) and self.d_ffn <= 0:
            problems.append("a feed-forward layer needs d_ffn > 0")
        if "moe" in self.ffns and not 1 <= self.top_k <= self.n_experts:
            problems.append(f"top_k {self.top_k} must be in [1, n_experts={self.n_experts}]")
        if problems:
            raise ValueError(f"invalid LMConfig ({self.family}): " + "; ".join(problems))

    @property
    def nheads(self) -> int:
        """Mamba-2 SSM heads."""
        return self.d_inner // self.headdim


def pad_vocab(vocab_size: int, multiple: int) -> int:
    """mamba_ssm rounds the embedding up to a multiple (8 for Mamba-1, 16 for Mamba-2 checkpoints)."""
    return vocab_size if multiple <= 1 else -(-vocab_size // multiple) * multiple
