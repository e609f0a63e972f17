"""One explicit configuration for every language model mambavl runs: Mamba-1, FalconMamba, Mamba-2
and the Jamba hybrid differ only in the values of these fields (which mixer each layer has, which
feed-forward, which inner norms), never in code paths chosen by family name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mambavl.checkpoints.fields import show, type_problems


@dataclass(frozen=True)
class LayerKind:
    """What the rest of the library needs to know of a kind of mixer or feed-forward, in one place."""

    name: str
    fixed_state: bool = True  # its decode state keeps one size (Mamba); False: a KV cache that grows
    static_shapes: bool = True  # the same kernels and shapes every step (False: data-dependent routing)
    parts: tuple[str, ...] = ()  # the kinds it runs (Falcon-H1: side by side; Zamba2: one feeding the other)


MIXER_KINDS = {
    kind.name: kind
    for kind in (
        LayerKind("mamba1"),
        LayerKind("mamba2"),
        LayerKind("attention", fixed_state=False),
        # Falcon-H1: Mamba-2 and attention in parallel on the layer's normalised input, outputs added
        LayerKind("mamba2+attention", fixed_state=False, parts=("mamba2", "attention")),
        # Zamba2: a shared attention + MLP block (one of `shared_blocks`, taken in turn) reads the residual
        # stream beside the input embeddings; its output, through this layer's own linear, joins the
        # Mamba-2 mixer's input (not the stream)
        LayerKind("shared+mamba2", fixed_state=False, parts=("mamba2", "attention")),
        LayerKind("none"),  # a feed-forward block alone (Nemotron-H's MLP blocks)
    )
}
FFN_KINDS = {
    kind.name: kind for kind in (LayerKind("none"), LayerKind("mlp"), LayerKind("moe", static_shapes=False))
}
MIXERS = tuple(MIXER_KINDS)
FFN_ACTS = ("silu_gated", "relu2", "gelu_gated")
MOE_ROUTINGS = ("softmax_topk", "topk_softmax", "sigmoid_grouped")
FFNS = tuple(FFN_KINDS)
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
    rotary_dim: int = 0  # channels of each head rotated by RoPE (0: no positional encoding)
    rope_theta: float = 10000.0
    attention_scale: float = 0.0  # q·k's softmax scale (0: 1/√head_dim; Granite's attention_multiplier)
    # Granite's µP multipliers: input embeddings, what each sublayer adds to the residual stream, logits (÷)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    d_ffn: int = 0
    ffn_act: str = "silu_gated"  # silu_gated: SwiGLU (gate, up, down); gelu_gated: GeGLU; relu2: relu(up x)²
    n_experts: int = 1
    top_k: int = 2
    # how the router weighs the chosen experts: softmax over all experts, then the top k as they are
    # (Jamba), or the top k logits, then a softmax over those (Granite), or sigmoid scores chosen within
    # the best `moe_topk_groups` of `moe_groups` groups after a learned bias (`router_bias`), optionally
    # renormalised over the top k, times `moe_scaling` (Nemotron-H, as DeepSeek-V3)
    moe_routing: str = "softmax_topk"
    moe_groups: int = 1
    moe_topk_groups: int = 1
    moe_norm_topk: bool = False
    moe_scaling: float = 1.0
    d_expert_ffn: int = 0  # each expert's hidden width (0: d_ffn)
    d_shared_ffn: int = 0  # > 0: an MLP (ffn_act) of this width beside the experts, its output added
    # Zamba2's shared blocks (attention over [stream, embeddings] then a gated MLP of width d_ffn), used in
    # turn by the `shared+mamba2` layers; each use adds its own low-rank adapters (rank `adapter_rank`) to
    # the MLP's gate_up projection, and with `shared_qkv_adapters` to q, k and v
    shared_blocks: int = 0
    adapter_rank: int = 0
    shared_qkv_adapters: bool = False
    # blocks
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    extra: dict = field(default_factory=dict, compare=False)  # the source config, kept for reference

    def uses(self, kind: str) -> bool:
        """Whether some layer runs a mixer of `kind`, alone or as a part of a parallel one."""
        return any(m == kind or kind in getattr(MIXER_KINDS.get(m), "parts", ()) for m in self.mixers)

    @property
    def fixed_state(self) -> bool:
        """Every layer's decode state keeps one size (no attention KV cache growing with the sequence):
        sequences can share slots of one tensor."""
        return all(MIXER_KINDS[m].fixed_state for m in self.mixers)

    @property
    def static_shapes(self) -> bool:
        """A decode step runs the same kernels on the same shapes every time (it can be captured)."""
        return all(FFN_KINDS[f].static_shapes for f in self.ffns)

    def __post_init__(self):
        def fix(name, value):
            object.__setattr__(self, name, value)

        # types and ranges first: the derived sizes below would turn a string d_model into a string d_inner,
        # and a huge n_layer into a huge tuple
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        problems = type_problems(LMConfig, values) or self._range_problems()
        if problems:
            raise ValueError(f"invalid LMConfig ({self.family}): " + "; ".join(problems))
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
        if self.uses("attention") and not self.head_dim:
            fix("head_dim", self.d_model // max(self.n_heads, 1))
        self.validate()

    def _range_problems(self) -> list[str]:
        problems = [
            f"{name} must be {rule}, got {show(getattr(self, name))}"
            for name, rule, ok in _RANGES
            if not ok(getattr(self, name))
        ]
        lo, hi = self.dt_limit
        if not 0 <= lo <= hi:
            problems.append(f"dt_limit must be (low, high) with 0 ≤ low ≤ high, got {tuple(self.dt_limit)}")
        if self.default_mixer not in MIXERS:
            problems.append(f"default_mixer={self.default_mixer!r}; expected one of {MIXERS}")
        return problems

    def validate(self) -> None:
        problems = []
        if not _size(self.d_inner):  # derived: expand × d_model
            problems.append(f"d_inner (expand × d_model) must be in [1, {MAX_SIZE}], got {self.d_inner}")
        if len(self.mixers) != self.n_layer or len(self.ffns) != self.n_layer:
            problems.append(f"mixers/ffns must list {self.n_layer} layers")
        if bad := set(self.mixers) - set(MIXERS):
            problems.append(f"unknown mixer(s) {sorted(bad)}; expected {MIXERS}")
        if bad := set(self.ffns) - set(FFNS):
            problems.append(f"unknown ffn(s) {sorted(bad)}; expected {FFNS}")
        if self.ffn_act not in FFN_ACTS:
            problems.append(f"ffn_act={self.ffn_act!r}; expected one of {FFN_ACTS}")
        if empty := [
            i for i, (m, f) in enumerate(zip(self.mixers, self.ffns, strict=False)) if m == f == "none"
        ]:
            problems.append(f"layers {empty[:8]} have neither a mixer nor a feed-forward")
        if self.bcdt_norm not in BCDT_NORMS:
            problems.append(f"bcdt_norm={self.bcdt_norm!r}; expected one of {BCDT_NORMS}")
        if self.uses("mamba2"):
            if self.d_inner % self.headdim:
                problems.append(f"d_inner {self.d_inner} is not a multiple of headdim {self.headdim}")
            elif self.nheads % self.ngroups:
                problems.append(f"ngroups {self.ngroups} does not divide {self.nheads} heads")
            if self.d_inner % self.ngroups:
                problems.append(f"ngroups {self.ngroups} does not divide d_inner {self.d_inner}")
        heads_ok = self.n_heads > 0 and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0
        if self.uses("attention") and not heads_ok:
            problems.append(
                f"attention needs n_heads ({self.n_heads}) a multiple of n_kv_heads ({self.n_kv_heads}) > 0"
            )
        if self.uses("attention") and self.head_dim <= 0:
            problems.append(f"attention needs head_dim > 0 (d_model {self.d_model} / n_heads {self.n_heads})")
        if self.rotary_dim < 0 or self.rotary_dim % 2 or (self.head_dim and self.rotary_dim > self.head_dim):
            problems.append(f"rotary_dim={self.rotary_dim} must be even and in [0, head_dim={self.head_dim}]")
        if self.uses("shared+mamba2"):
            if self.shared_blocks < 1 or self.d_ffn <= 0:
                problems.append("shared+mamba2 layers need shared_blocks ≥ 1 and d_ffn > 0")
            if self.n_heads * self.head_dim != 2 * self.d_model:
                problems.append(
                    f"the shared blocks' attention reads 2·d_model = {2 * self.d_model} channels: n_heads "
                    f"({self.n_heads}) × head_dim ({self.head_dim}) must equal it"
                )
            if self.shared_qkv_adapters and (self.adapter_rank < 1 or self.n_kv_heads != self.n_heads):
                problems.append("q/k/v adapters need adapter_rank ≥ 1 and n_kv_heads = n_heads")
        elif self.shared_blocks:
            problems.append(f"shared_blocks={self.shared_blocks} but no layer is shared+mamba2")
        if any(f != "none" for f in self.ffns) and self.d_ffn <= 0:
            problems.append("a feed-forward layer needs d_ffn > 0")
        if self.moe_routing not in MOE_ROUTINGS:
            problems.append(f"moe_routing={self.moe_routing!r}; expected one of {MOE_ROUTINGS}")
        if "moe" in self.ffns and not 1 <= self.top_k <= self.n_experts:
            problems.append(f"top_k {self.top_k} must be in [1, n_experts={self.n_experts}]")
        grouped = self.moe_routing == "sigmoid_grouped"
        if grouped and (self.n_experts % self.moe_groups or not 1 <= self.moe_topk_groups <= self.moe_groups):
            problems.append(
                f"sigmoid_grouped routing needs moe_groups ({self.moe_groups}) dividing n_experts "
                f"({self.n_experts}) and moe_topk_groups ({self.moe_topk_groups}) in [1, moe_groups]"
            )
        if grouped and self.n_experts // self.moe_groups < 2:
            problems.append(
                "sigmoid_grouped routing scores each group by its best two experts: 2 a group at least"
            )
        if grouped and self.top_k > self.moe_topk_groups * (self.n_experts // self.moe_groups):
            problems.append(
                f"top_k {self.top_k} exceeds the experts of the {self.moe_topk_groups} chosen groups"
            )
        if problems:
            raise ValueError(f"invalid LMConfig ({self.family}): " + "; ".join(problems))

    @property
    def shared_layers(self) -> tuple[int, ...]:
        """The `shared+mamba2` layers in order: the u-th uses shared block u mod `shared_blocks`."""
        return tuple(i for i, m in enumerate(self.mixers) if m == "shared+mamba2")

    @property
    def nheads(self) -> int:
        """Mamba-2 SSM heads."""
        return self.d_inner // self.headdim


# Bounds far above any real model (64 layers, d_model 8192, a 256k vocabulary, 256 experts): a config past
# them is broken or hostile, and would only hang the loader or overflow a tensor's size.
MAX_LAYERS = 4096
MAX_SIZE = 2**24
MAX_EXPERTS = 1024


def _size(v) -> bool:
    return 0 < v <= MAX_SIZE


def _size_or_derived(v) -> bool:
    return 0 <= v <= MAX_SIZE


def _finite_positive(v) -> bool:
    return math.isfinite(v) and v > 0


_SIZES = ("d_model", "vocab_size", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size")
_SIZES_OR_ZERO = (
    "d_inner",
    "dt_rank",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "d_ffn",
    "d_expert_ffn",
    "d_shared_ffn",
    "shared_blocks",
    "adapter_rank",
)  # 0: derived, or none
# (field, rule, check) of the values a config gives, checked before anything is derived from them
_RANGES = [
    *((n, f"in [1, {MAX_SIZE}]", _size) for n in _SIZES),
    *((n, f"in [0, {MAX_SIZE}]", _size_or_derived) for n in _SIZES_OR_ZERO),
    ("n_layer", f"in [1, {MAX_LAYERS}]", lambda v: 1 <= v <= MAX_LAYERS),
    ("n_experts", f"in [1, {MAX_EXPERTS}]", lambda v: 1 <= v <= MAX_EXPERTS),
    ("top_k", "> 0", lambda v: v > 0),
    ("moe_groups", f"in [1, {MAX_EXPERTS}]", lambda v: 1 <= v <= MAX_EXPERTS),
    ("moe_topk_groups", f"in [1, {MAX_EXPERTS}]", lambda v: 1 <= v <= MAX_EXPERTS),
    *(
        (n, "finite and > 0", _finite_positive)
        for n in ("bcdt_eps", "gated_norm_eps", "norm_eps", "moe_scaling")
    ),
]


def pad_vocab(vocab_size: int, multiple: int) -> int:
    """mamba_ssm rounds the embedding up to a multiple (8 for Mamba-1, 16 for Mamba-2 checkpoints)."""
    return vocab_size if multiple <= 1 else -(-vocab_size // multiple) * multiple
