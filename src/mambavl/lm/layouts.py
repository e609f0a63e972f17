"""Language-model checkpoint layouts we read: transformers' (model_type mamba, falcon_mamba, mamba2,
jamba) and mamba_ssm's original one (config.json with d_model, n_layer, ssm_cfg; keys under
`backbone.`). Each layout gives an LMConfig and a renaming of its keys to ours.

Our keys: embedding.weight, layers.{i}.norm.weight, layers.{i}.mixer.*, layers.{i}.ffn_norm.weight,
layers.{i}.ffn.*, norm_f.weight, lm_head.weight (absent when tied). Mixer parameter names are the
checkpoints' own (in_proj, conv1d, x_proj, dt_proj, A_log, D, dt_bias, norm, q_proj, ...).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from mambavl.checkpoints.fields import ConfigFields, show
from mambavl.checkpoints.files import CheckpointError
from mambavl.lm.config import MAX_LAYERS, LMConfig, pad_vocab
from mambavl.ops.timestep import NO_LIMIT


def _rank(f: ConfigFields, key: str, d_model: int) -> int:
    """A dt rank: an integer, or "auto" (the default) for ceil(d_model / 16)."""
    if f.raw.get(key, "auto") in (None, "auto"):
        return math.ceil(d_model / 16)
    return f.integer(key)


def _limit(f: ConfigFields, key: str, default) -> tuple[float, float]:
    """A time_step_limit pair; transformers ≥ 5 writes infinity as {"__float__": "Infinity"}."""
    value = f.raw.get(key)
    if value is None:
        return default

    def num(v):
        v = v.get("__float__") if isinstance(v, dict) else v
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise ValueError
        return float(v)

    try:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError
        return tuple(num(v) for v in value)
    except ValueError:
        raise f.fail(key, "a pair of numbers [low, high]", value) from None


def _hf_mamba(f: ConfigFields) -> LMConfig:
    falcon = f.raw["model_type"] == "falcon_mamba"
    f.text("hidden_act", "silu", ["silu"])
    d_model = f.integer("hidden_size", 768)
    expand = f.integer("expand", 2)
    return LMConfig(
        family=f.raw["model_type"],
        d_model=d_model,
        n_layer=f.integer("num_hidden_layers", 32),
        vocab_size=f.integer("vocab_size", 50280),
        d_state=f.integer("state_size", 16),
        d_conv=f.integer("conv_kernel", 4),
        expand=expand,
        # FalconMamba-7B's config says expand 16 yet intermediate_size 8192: the weights have the latter.
        d_inner=f.integer("intermediate_size", 0, minimum=0) or expand * d_model,
        conv_bias=f.flag("use_conv_bias", True),
        proj_bias=f.flag("use_bias", False),
        dt_rank=_rank(f, "time_step_rank", d_model),
        bcdt_norm="weightless" if falcon else None,
        bcdt_eps=f.number("mixer_rms_eps", 1e-6),
        norm_eps=f.number("layer_norm_epsilon", 1e-5),
        residual_in_fp32=f.flag("residual_in_fp32", True),
        tie_embeddings=f.flag("tie_word_embeddings", True),
        extra=f.raw,
    )


def _hf_mamba2(f: ConfigFields) -> LMConfig:
    f.text("hidden_act", "silu", ["silu"])
    d_model = f.integer("hidden_size", 4096)
    d_inner = f.integer("expand", 2) * d_model
    heads, headdim = f.integer("num_heads", 128), f.integer("head_dim", 64)
    if heads * headdim != d_inner:
        raise CheckpointError(
            f"{f.source}: num_heads {heads} × head_dim {headdim} must equal expand × hidden_size = {d_inner}"
        )
    eps = f.number("layer_norm_epsilon", 1e-5)
    return LMConfig(
        family="mamba2",
        default_mixer="mamba2",
        d_model=d_model,
        n_layer=f.integer("num_hidden_layers", 64),
        vocab_size=f.integer("vocab_size", 32768),
        d_state=f.integer("state_size", 128),
        d_conv=f.integer("conv_kernel", 4),
        d_inner=d_inner,
        headdim=headdim,
        ngroups=f.integer("n_groups", 8),
        chunk_size=f.integer("chunk_size", 256),
        dt_limit=_limit(f, "time_step_limit", NO_LIMIT),
        conv_bias=f.flag("use_conv_bias", True),
        proj_bias=f.flag("use_bias", False),
        gated_norm_eps=eps,
        norm_eps=eps,
        residual_in_fp32=f.flag("residual_in_fp32", True),
        tie_embeddings=f.flag("tie_word_embeddings", False),
        extra=f.raw,
    )


def _hf_jamba(f: ConfigFields) -> LMConfig:
    f.text("hidden_act", "silu", ["silu"])
    n = f.integer("num_hidden_layers", 32)
    d_model = f.integer("hidden_size", 4096)
    ap, ao = f.integer("attn_layer_period", 8), f.integer("attn_layer_offset", 4, minimum=0)
    ep, eo = f.integer("expert_layer_period", 2), f.integer("expert_layer_offset", 1, minimum=0)
    experts = f.integer("num_experts", 16)
    heads = f.integer("num_attention_heads", 32)
    eps = f.number("rms_norm_eps", 1e-6)
    return LMConfig(
        family="jamba",
        d_model=d_model,
        n_layer=n,
        vocab_size=f.integer("vocab_size", 65536),
        mixers=tuple("attention" if i % ap == ao else "mamba1" for i in range(min(n, MAX_LAYERS))),
        ffns=tuple("moe" if experts > 1 and i % ep == eo else "mlp" for i in range(min(n, MAX_LAYERS))),
        d_state=f.integer("mamba_d_state", 16),
        d_conv=f.integer("mamba_d_conv", 4),
        expand=f.integer("mamba_expand", 2),
        dt_rank=_rank(f, "mamba_dt_rank", d_model),
        conv_bias=f.flag("mamba_conv_bias", True),
        proj_bias=f.flag("mamba_proj_bias", False),
        bcdt_norm="weighted",
        bcdt_eps=eps,
        n_heads=heads,
        n_kv_heads=f.integer("num_key_value_heads", heads),
        head_dim=f.integer("head_dim", d_model // heads),
        d_ffn=f.integer("intermediate_size", 14336),
        n_experts=experts,
        top_k=f.integer("num_experts_per_tok", 2),
        norm_eps=eps,
        residual_in_fp32=False,
        tie_embeddings=f.flag("tie_word_embeddings", False),
        extra=f.raw,
    )


# Nemotron-H's block kinds: the pattern letters of its original config and transformers' names (old and new)
NEMOTRON_PATTERN = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
NEMOTRON_NAMES = {
    "linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention", "attention": "attention",
    "mlp": "mlp", "moe": "moe",
}  # fmt: skip


def _nemotron_blocks(f: ConfigFields) -> list[str]:
    """Each block's kind (mamba, attention, mlp, moe) from layers_block_type or hybrid_override_pattern."""
    listed = f.raw.get("layers_block_type", f.raw.get("layer_types"))
    if listed is not None:
        known = isinstance(listed, list) and all(isinstance(b, str) and b in NEMOTRON_NAMES for b in listed)
        if not known:
            raise f.fail("layers_block_type", f"a list of {sorted(NEMOTRON_NAMES)}", listed)
        blocks = [NEMOTRON_NAMES[b] for b in listed]
    else:
        pattern = f.raw.get("hybrid_override_pattern")
        if not isinstance(pattern, str) or not pattern or set(pattern) - set(NEMOTRON_PATTERN):
            raise f.fail("hybrid_override_pattern", f"a string of {''.join(NEMOTRON_PATTERN)}", pattern)
        blocks = [NEMOTRON_PATTERN[c] for c in pattern]
    if not 1 <= len(blocks) <= MAX_LAYERS:
        raise CheckpointError(f"{f.source}: {len(blocks)} blocks; mambavl reads 1 to {MAX_LAYERS}")
    return blocks


def _nemotron_moe(f: ConfigFields, present: bool) -> dict:
    """The LMConfig fields of Nemotron-H's expert blocks (squared-ReLU experts and shared MLP, sigmoid
    scores chosen within the best groups after a learned bias, DeepSeek-V3's routing)."""
    if not present:
        return {}
    if f.raw.get("moe_latent_size") is not None:
        raise CheckpointError(
            f"{f.source}: moe_latent_size (experts in a projected latent space) is not supported yet"
        )
    return dict(
        n_experts=f.integer("n_routed_experts", 8),
        top_k=f.integer("num_experts_per_tok", 2),
        d_expert_ffn=f.integer("moe_intermediate_size", 7688),
        d_shared_ffn=f.integer("moe_shared_expert_intermediate_size", 7688),
        moe_routing="sigmoid_grouped",
        moe_groups=f.integer("n_group", 1),
        moe_topk_groups=f.integer("topk_group", 1),
        moe_norm_topk=f.flag("norm_topk_prob", True),
        moe_scaling=f.number("routed_scaling_factor", 1.0),
    )


def _hf_nemotron_h(f: ConfigFields) -> LMConfig:
    """Nemotron-H: one kind per block (Mamba-2, attention without positional encoding, or a squared-ReLU
    MLP); an MLP block is our layer without a mixer. Residuals stay in the weights' dtype, as in
    transformers."""
    blocks = _nemotron_blocks(f)
    f.text("mamba_hidden_act", "silu", ["silu"])
    act = f.text("mlp_hidden_act", "relu2", ["relu2"])
    for key in ("attention_bias", "mlp_bias"):
        if f.flag(key, False):
            raise CheckpointError(f"{f.source}: {key}=true is not supported (Nemotron-H releases have none)")
    d_model = f.integer("hidden_size", 4096)
    heads, headdim = f.integer("mamba_num_heads", 128), f.integer("mamba_head_dim", 64)
    n_heads = f.integer("num_attention_heads", 32)
    eps = f.number("layer_norm_epsilon", 1e-5)
    return LMConfig(
        family="nemotron_h",
        d_model=d_model,
        n_layer=len(blocks),
        vocab_size=f.integer("vocab_size", 131072),
        mixers=tuple({"mamba": "mamba2", "attention": "attention"}.get(b, "none") for b in blocks),
        ffns=tuple(b if b in ("mlp", "moe") else "none" for b in blocks),
        d_state=f.integer("ssm_state_size", 128),
        d_conv=f.integer("conv_kernel", 4),
        d_inner=heads * headdim,
        headdim=headdim,
        ngroups=f.integer("n_groups", 8),
        chunk_size=f.integer("chunk_size", 128),
        dt_limit=_limit(f, "time_step_limit", NO_LIMIT),
        conv_bias=f.flag("use_conv_bias", True),
        proj_bias=f.flag("use_bias", False),
        gated_norm_eps=eps,
        n_heads=n_heads,
        n_kv_heads=f.integer("num_key_value_heads", n_heads),
        head_dim=f.integer("head_dim", d_model // n_heads),
        d_ffn=f.integer("intermediate_size", 21504),
        ffn_act=act,
        **_nemotron_moe(f, "moe" in blocks),
        norm_eps=eps,
        residual_in_fp32=False,
        tie_embeddings=f.flag("tie_word_embeddings", False),
        extra=f.raw,
    )


def _mamba_headdim(f: ConfigFields, d_inner: int) -> int:
    """The Mamba-2 head size of the `mamba_*` configs (Bamba, Granite-4.0-H, Falcon-H1): mamba_d_head, or
    "auto" (d_inner / mamba_n_heads); the heads must tile d_inner."""
    heads = f.integer("mamba_n_heads", 128)
    headdim = d_inner // heads if f.raw.get("mamba_d_head", "auto") == "auto" else f.integer("mamba_d_head")
    if heads * headdim != d_inner:
        raise CheckpointError(f"{f.source}: mamba_n_heads {heads} × mamba_d_head {headdim} ≠ {d_inner}")
    return headdim


def _layer_count(f: ConfigFields, default: int) -> int:
    """num_hidden_layers, within what mambavl reads."""
    n = f.integer("num_hidden_layers", default)
    if n > MAX_LAYERS:
        raise CheckpointError(f"{f.source}: {n} layers; mambavl reads at most {MAX_LAYERS}")
    return n


def _ibm_hybrid(f: ConfigFields, eps_default: float) -> tuple[int, dict]:
    """What Bamba's and Granite-4.0-H's configs spell alike (their `mamba_*` fields, attention heads, the
    layer count): (layers, LMConfig fields)."""
    f.text("hidden_act", "silu", ["silu"])
    n = _layer_count(f, 32)
    d_model = f.integer("hidden_size", 4096)
    d_inner = f.integer("mamba_expand", 2) * d_model
    headdim = _mamba_headdim(f, d_inner)
    n_heads = f.integer("num_attention_heads", 32)
    eps = f.number("rms_norm_eps", eps_default)
    return n, dict(
        d_model=d_model,
        n_layer=n,
        ffns=("mlp",) * n,
        d_state=f.integer("mamba_d_state", 256),
        d_conv=f.integer("mamba_d_conv", 4),
        d_inner=d_inner,
        headdim=headdim,
        ngroups=f.integer("mamba_n_groups", 1),
        chunk_size=f.integer("mamba_chunk_size", 256),
        dt_limit=_limit(f, "time_step_limit", NO_LIMIT),
        conv_bias=f.flag("mamba_conv_bias", True),
        proj_bias=f.flag("mamba_proj_bias", False),
        gated_norm_eps=eps,
        n_heads=n_heads,
        n_kv_heads=f.integer("num_key_value_heads", n_heads),
        head_dim=d_model // n_heads,
        rope_theta=f.section("rope_parameters").number("rope_theta", f.number("rope_theta", 10000.0)),
        norm_eps=eps,
        residual_in_fp32=False,
        tie_embeddings=f.flag("tie_word_embeddings", False),
        extra=f.raw,
    )


def _hf_bamba(f: ConfigFields) -> LMConfig:
    """Bamba: Mamba-2 layers with a few attention layers (RoPE on half of each head), a SwiGLU MLP in
    every layer."""
    for key in ("attention_bias", "mlp_bias"):
        if f.flag(key, False):
            raise CheckpointError(f"{f.source}: {key}=true is not supported (Bamba releases have none)")
    n, fields = _ibm_hybrid(f, 1e-5)
    attn = f.raw.get("attn_layer_indices") or []
    if not isinstance(attn, list) or not all(isinstance(i, int) and 0 <= i < n for i in attn):
        raise f.fail("attn_layer_indices", f"a list of layer indices below {n}", attn)
    return LMConfig(
        family="bamba",
        vocab_size=f.integer("vocab_size", 128000),
        mixers=tuple("attention" if i in attn else "mamba2" for i in range(n)),
        rotary_dim=fields["head_dim"] // 2 // 2 * 2,  # Bamba: partial_rotary_factor fixed at 0.5
        d_ffn=f.integer("intermediate_size", 14336),
        **fields,
    )


def _granite_hybrid(f: ConfigFields) -> LMConfig:
    """Granite-4.0-H (transformers' granitemoehybrid): Mamba-2 and attention layers (no positional encoding,
    or RoPE), each with a SwiGLU shared MLP and, where `num_local_experts` > 0, top-k experts beside it
    (softmax over the chosen logits); Granite's multipliers (embeddings, residual adds, attention scale,
    logits)."""
    experts = f.integer("num_local_experts", 8, minimum=0)
    if f.flag("attention_bias", False):
        raise CheckpointError(f"{f.source}: attention_bias=true is not supported")
    n, fields = _ibm_hybrid(f, 1e-6)
    listed = f.raw.get("layer_types", f.raw.get("layers_block_type")) or ["mamba"] * n
    kinds = {"mamba": "mamba2", "linear_attention": "mamba2", "attention": "attention"}
    kinds["full_attention"] = "attention"
    if not isinstance(listed, list) or len(listed) != n or not all(t in kinds for t in listed):
        raise f.fail("layer_types", f"{n} of {sorted(kinds)}", listed)
    position = f.raw.get("position_embedding_type") or "nope"
    if position not in ("nope", "rope"):
        raise f.fail("position_embedding_type", "'rope', 'nope' or null", position)
    shared = f.integer("shared_intermediate_size", 1024)
    fields["ffns"] = ("moe" if experts else "mlp",) * n  # dense: the shared MLP is the layer's MLP
    return LMConfig(
        family="granitemoehybrid",
        vocab_size=f.integer("vocab_size", 32000),
        mixers=tuple(kinds[t] for t in listed),
        rotary_dim=fields["head_dim"] if position == "rope" else 0,
        attention_scale=f.number("attention_multiplier", 1.0),
        embedding_multiplier=f.number("embedding_multiplier", 1.0),
        residual_multiplier=f.number("residual_multiplier", 1.0),
        logits_scaling=f.number("logits_scaling", 1.0),
        d_ffn=f.integer("intermediate_size", 11008) if experts else shared,
        n_experts=max(experts, 1),
        top_k=f.integer("num_experts_per_tok", 2),
        moe_routing="topk_softmax",
        d_shared_ffn=shared if experts else 0,  # with experts, the shared MLP sits beside them
        **fields,
    )


# mamba_ssm's per-layer defaults (modules/mamba_simple.py `Mamba`, modules/mamba2.py `Mamba2`).
MAMBA_SSM_DEFAULTS = {
    "Mamba1": dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True, bias=False),
    "Mamba2": dict(
        d_state=128,
        d_conv=4,
        expand=2,
        headdim=64,
        ngroups=1,
        chunk_size=256,
        rmsnorm=True,
        norm_before_gate=False,
        D_has_hdim=False,
        dt_limit=NO_LIMIT,
        conv_bias=True,
        bias=False,
    ),
}


def _mamba_ssm(f: ConfigFields) -> LMConfig:
    ssm = f.section("ssm_cfg")
    layer = ssm.text("layer", "Mamba1", list(MAMBA_SSM_DEFAULTS))
    if d_intermediate := f.integer("d_intermediate", 0, minimum=0):
        raise CheckpointError(f"{f.source}: d_intermediate={d_intermediate} (an MLP) is not supported")
    if f.raw.get("attn_layer_idx"):
        raise CheckpointError(
            f"{f.source}: attn_layer_idx (attention layers) is not supported; it must be []"
        )
    if not f.flag("rms_norm", True):
        raise CheckpointError(f"{f.source}: rms_norm=false (LayerNorm blocks) is not supported")
    ssm.text("activation", "silu", ["silu", "swish"])
    o = MAMBA_SSM_DEFAULTS[layer]
    d_model = f.integer("d_model")
    expand = ssm.integer("expand", o["expand"])
    if ssm.raw.get("d_ssm") not in (None, expand * d_model):
        raise CheckpointError(
            f"{f.source}: ssm_cfg.d_ssm={show(ssm.raw['d_ssm'])} (a partial SSM) is not supported"
        )
    common = dict(
        d_model=d_model,
        n_layer=f.integer("n_layer"),
        vocab_size=pad_vocab(f.integer("vocab_size"), f.integer("pad_vocab_size_multiple", 8)),
        d_state=ssm.integer("d_state", o["d_state"]),
        d_conv=ssm.integer("d_conv", o["d_conv"]),
        expand=expand,
        conv_bias=ssm.flag("conv_bias", o["conv_bias"]),
        proj_bias=ssm.flag("bias", o["bias"]),
        norm_eps=f.number("norm_epsilon", 1e-5),
        residual_in_fp32=f.flag("residual_in_fp32", True),
        tie_embeddings=f.flag("tie_embeddings", True),
        extra=f.raw,
    )
    if layer == "Mamba1":
        return LMConfig(family="mamba", dt_rank=_rank(ssm, "dt_rank", d_model), **common)
    return LMConfig(
        family="mamba2",
        default_mixer="mamba2",
        headdim=ssm.integer("headdim", o["headdim"]),
        ngroups=ssm.integer("ngroups", o["ngroups"]),
        chunk_size=ssm.integer("chunk_size", o["chunk_size"]),
        dt_limit=_limit(ssm, "dt_limit", o["dt_limit"]),
        gated_norm=ssm.flag("rmsnorm", o["rmsnorm"]),
        norm_before_gate=ssm.flag("norm_before_gate", o["norm_before_gate"]),
        d_has_hdim=ssm.flag("D_has_hdim", o["D_has_hdim"]),
        gated_norm_eps=1e-5,
        **common,
    )


def _numbers(f: ConfigFields, key: str, count: int) -> tuple[float, ...]:
    """A list of `count` finite numbers (1.0 each where the key is absent or null)."""
    value = f.raw.get(key)
    if value is None:
        return (1.0,) * count
    ok = isinstance(value, list | tuple) and len(value) == count
    if not ok or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise f.fail(key, f"a list of {count} numbers", value)
    if not all(math.isfinite(v) for v in value):
        raise f.fail(key, f"a list of {count} finite numbers", value)
    return tuple(float(v) for v in value)


FALCON_H1_MULTIPLIERS = (
    "key_multiplier", "attention_in_multiplier", "attention_out_multiplier", "ssm_in_multiplier",
    "ssm_out_multiplier",
)  # fmt: skip


def _hf_falcon_h1(f: ConfigFields) -> LMConfig:
    """Falcon-H1: in every layer Mamba-2 and attention (RoPE on whole heads) side by side on the normalised
    input, their outputs added, then a SwiGLU MLP; µP multipliers on the embedding, the logits and inside
    each layer. Those inside a layer scale a projection's input or output, so the loader folds them into
    the projections' weights (`fold_falcon_h1`); the config keeps the embedding's and the logits'."""
    for key in ("attention_bias", "mlp_bias", "projectors_bias", "mamba_proj_bias"):
        if f.flag(key, False):
            raise CheckpointError(f"{f.source}: {key}=true is not supported (Falcon-H1 releases have none)")
    f.text("hidden_act", "silu", ["silu"])
    rope = f.section("rope_parameters")
    rope.text("rope_type", "default", ["default"])
    for key in FALCON_H1_MULTIPLIERS:
        f.number(key, 1.0, positive=False)
    _numbers(f, "ssm_multipliers", 5), _numbers(f, "mlp_multipliers", 2)  # checked here, folded on load
    n = _layer_count(f, 32)
    d_model = f.integer("hidden_size", 4096)
    if f.raw.get("mamba_d_ssm") is not None:
        d_inner = f.integer("mamba_d_ssm")
    else:
        d_inner = f.integer("mamba_expand", 2) * d_model
    headdim = _mamba_headdim(f, d_inner)
    n_heads = f.integer("num_attention_heads", 32)
    head_dim = f.integer("head_dim") if f.raw.get("head_dim") is not None else d_model // n_heads
    groups = f.integer("mamba_n_groups", 1)
    eps = f.number("rms_norm_eps", 1e-5)
    return LMConfig(
        family="falcon_h1",
        d_model=d_model,
        n_layer=n,
        vocab_size=f.integer("vocab_size", 128000),
        mixers=("mamba2+attention",) * n,
        ffns=("mlp",) * n,
        d_ffn=f.integer("intermediate_size", 14336),
        d_state=f.integer("mamba_d_state", 256),
        d_conv=f.integer("mamba_d_conv", 4),
        d_inner=d_inner,
        headdim=headdim,
        ngroups=groups,
        chunk_size=f.integer("mamba_chunk_size", 256),
        dt_limit=_limit(f, "time_step_limit", NO_LIMIT),
        conv_bias=f.flag("mamba_conv_bias", True),
        gated_norm=f.flag("mamba_rms_norm", False),
        norm_before_gate=f.flag("mamba_norm_before_gate", True),
        gated_norm_eps=eps,
        n_heads=n_heads,
        n_kv_heads=f.integer("num_key_value_heads", n_heads),
        head_dim=head_dim,
        rotary_dim=head_dim,
        rope_theta=rope.number("rope_theta", f.number("rope_theta", 10000.0)),
        norm_eps=eps,
        residual_in_fp32=False,
        embedding_multiplier=f.number("embedding_multiplier", 1.0, positive=False),
        logits_scaling=1.0 / f.number("lm_head_multiplier", 1.0),
        tie_embeddings=f.flag("tie_word_embeddings", False),
        extra=f.raw,
    )


def fold_falcon_h1(sd: dict[str, torch.Tensor], config: LMConfig, where: str) -> dict[str, torch.Tensor]:
    """Falcon-H1's multipliers inside each layer folded into the weights (our keys): the SSM's input and
    its µP vector into in_proj's rows, its output into out_proj, attention's input into q, k and v and the
    key multiplier into k, its output into o_proj, the MLP's gate and down multipliers into gate_proj and
    down_proj. Products in fp32, stored back in each tensor's dtype. The µP vector buffers the hub files
    may hold are dropped (it is computed from the config, as transformers does)."""
    f = ConfigFields(config.extra, where)
    m = {key: f.number(key, 1.0, positive=False) for key in FALCON_H1_MULTIPLIERS}
    z, x, b, c, dt = _numbers(f, "ssm_multipliers", 5)
    gate, down = _numbers(f, "mlp_multipliers", 2)
    d, gn = config.d_inner, config.ngroups * config.d_state
    mup = torch.cat([torch.full((n,), v) for n, v in ((d, z), (d, x), (gn, b), (gn, c), (config.nheads, dt))])
    scales = {
        "mixer.mamba.in_proj.weight": mup[:, None] * m["ssm_in_multiplier"],
        "mixer.mamba.in_proj.bias": mup,
        "mixer.mamba.out_proj.weight": m["ssm_out_multiplier"],
        "mixer.attn.q_proj.weight": m["attention_in_multiplier"],
        "mixer.attn.k_proj.weight": m["attention_in_multiplier"] * m["key_multiplier"],
        "mixer.attn.v_proj.weight": m["attention_in_multiplier"],
        "mixer.attn.o_proj.weight": m["attention_out_multiplier"],
        "ffn.gate_proj.weight": gate,
        "ffn.down_proj.weight": down,
    }
    out = {}
    for key, value in sd.items():
        if key.endswith(".mixer.mamba.mup_vector"):
            continue
        name = key.split(".", 2)[2] if key.startswith("layers.") else ""  # the key inside its layer
        scale = scales.get(name)
        if scale is not None and value.is_floating_point():
            if isinstance(scale, torch.Tensor) and scale.shape[0] != value.shape[0]:
                raise CheckpointError(
                    f"{where}: {key} has {value.shape[0]} rows, the config's µP vector {scale.shape[0]}"
                )
            value = (value.float() * scale).to(value.dtype)
        out[key] = value
    return out


ZAMBA2_KINDS = {"mamba": "mamba2", "linear_attention": "mamba2", "hybrid": "shared+mamba2"}
ZAMBA2_ACTS = {"gelu": "gelu_gated", "silu": "silu_gated"}


def _hf_zamba2(f: ConfigFields) -> LMConfig:
    """Zamba2: Mamba-2 layers, some of which ("hybrid") first run one of `num_mem_blocks` shared attention
    + MLP blocks on [stream, input embeddings] (per-use adapters; RoPE with use_mem_rope) and feed its
    output, through a linear of their own, into their Mamba-2 input (`lm.shared`)."""
    n = _layer_count(f, 54)
    listed = f.raw.get("layers_block_type", f.raw.get("layer_types"))
    if not isinstance(listed, list) or len(listed) != n or not all(t in ZAMBA2_KINDS for t in listed):
        raise f.fail("layers_block_type", f"a list of {n} of {sorted(ZAMBA2_KINDS)}", listed)
    d_model = f.integer("hidden_size", 2560)
    expand = f.number("mamba_expand", 2)
    d_inner = int(expand * d_model)
    heads = f.integer("n_mamba_heads", 8)
    if d_inner % heads:
        raise CheckpointError(f"{f.source}: n_mamba_heads {heads} does not divide mamba_expand × hidden_size")
    n_heads = f.integer("num_attention_heads", 32)
    if (2 * d_model) % n_heads:
        raise CheckpointError(f"{f.source}: num_attention_heads {n_heads} does not divide 2 × hidden_size")
    head_dim = 2 * d_model // n_heads
    act = f.text("hidden_act", "gelu", sorted(ZAMBA2_ACTS))
    rope = f.section("rope_parameters")
    rope.text("rope_type", "default", ["default"])
    kv = f.raw.get("num_key_value_heads")
    return LMConfig(
        family="zamba2",
        d_model=d_model,
        n_layer=n,
        vocab_size=f.integer("vocab_size", 32000),
        mixers=tuple(ZAMBA2_KINDS[t] for t in listed),
        d_state=f.integer("mamba_d_state", 64),
        d_conv=f.integer("mamba_d_conv", 4),
        d_inner=d_inner,
        headdim=d_inner // heads,
        ngroups=f.integer("mamba_ngroups", 1),
        chunk_size=f.integer("chunk_size", 256),
        dt_limit=(f.number("time_step_min", 0.001, positive=False), math.inf),
        conv_bias=f.flag("use_conv_bias", True),
        proj_bias=f.flag("add_bias_linear", False),
        gated_norm_eps=1e-5,  # transformers' Zamba2 fixes it
        n_heads=n_heads,
        n_kv_heads=n_heads if kv is None else f.integer("num_key_value_heads"),
        head_dim=head_dim,
        rotary_dim=head_dim if f.flag("use_mem_rope", False) else 0,
        rope_theta=rope.number("rope_theta", f.number("rope_theta", 10000.0)),
        attention_scale=(head_dim / 2) ** -0.5,  # Zamba2 scales q·k by √(head_dim / 2)
        d_ffn=f.integer("intermediate_size") if f.raw.get("intermediate_size") else 4 * d_model,
        ffn_act=ZAMBA2_ACTS[act],
        shared_blocks=f.integer("num_mem_blocks", 1),
        adapter_rank=f.integer("adapter_rank", 128),
        shared_qkv_adapters=f.flag("use_shared_attention_adapter", False),
        norm_eps=f.number("rms_norm_eps", 1e-5),
        residual_in_fp32=False,
        tie_embeddings=f.flag("tie_word_embeddings", True),
        extra=f.raw,
    )


HF_LAYOUTS = {
    "mamba": _hf_mamba,
    "falcon_mamba": _hf_mamba,
    "mamba2": _hf_mamba2,
    "jamba": _hf_jamba,
    "nemotron_h": _hf_nemotron_h,
    "bamba": _hf_bamba,
    "granitemoehybrid": _granite_hybrid,
    "falcon_h1": _hf_falcon_h1,
    "zamba2": _hf_zamba2,
}


def lm_config_from_json(raw: dict, source: Path | str) -> tuple[LMConfig, str]:
    """The LMConfig of a config.json and the layout name ('mamba_ssm' or the HF model_type). Every field
    is checked as it is read: a wrong one is a CheckpointError naming `source` and the field."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    f = ConfigFields(raw, source)
    model_type = raw.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise f.fail("model_type", "a string", model_type)
    try:
        if model_type is None and "d_model" in raw and "n_layer" in raw:
            return _mamba_ssm(f), "mamba_ssm"
        if model_type in HF_LAYOUTS:
            return HF_LAYOUTS[model_type](f), model_type
    except CheckpointError:
        raise
    except ValueError as e:  # LMConfig's own checks: sizes that do not fit together
        raise CheckpointError(f"{source}: invalid language-model config ({e})") from e
    raise CheckpointError(
        f"{source}: unknown model_type {model_type!r}. mambavl reads model_type "
        f"{sorted(HF_LAYOUTS)} (transformers) or mamba_ssm's config (d_model, n_layer, ssm_cfg)."
    )


_JAMBA_RENAMES = [
    (r"^model\.embed_tokens\.", "embedding."),
    (r"^model\.final_layernorm\.", "norm_f."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.norm."),
    (r"^model\.layers\.(\d+)\.pre_ff_layernorm\.", r"layers.\1.ffn_norm."),
    (r"^model\.layers\.(\d+)\.(?:self_attn|mamba)\.", r"layers.\1.mixer."),
    (r"^model\.layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$", r"layers.\1.ffn.\2"),
    (r"^model\.layers\.(\d+)\.feed_forward\.", r"layers.\1.ffn."),
]
_GRANITE_RENAMES = [
    (r"^model\.embed_tokens\.", "embedding."),
    (r"^model\.norm\.", "norm_f."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
    (r"^model\.layers\.(\d+)\.(?:self_attn|mamba)\.", r"layers.\1.mixer."),
    (r"^model\.layers\.(\d+)\.shared_mlp\.input_linear\.", r"layers.\1.ffn.SHARED.gate_up_proj."),
    (r"^model\.layers\.(\d+)\.shared_mlp\.output_linear\.", r"layers.\1.ffn.SHARED.down_proj."),
    # experts: transformers' names, and the hub's (input_linear, output_linear, router.layer)
    (r"^model\.layers\.(\d+)\.block_sparse_moe\.router\.(?:layer\.)?weight$", r"layers.\1.ffn.router.weight"),
    (r"^model\.layers\.(\d+)\.block_sparse_moe\.(?:experts\.gate_up_proj|input_linear\.weight)$",
     r"layers.\1.ffn.gate_up_proj"),
    (r"^model\.layers\.(\d+)\.block_sparse_moe\.(?:experts\.down_proj|output_linear\.weight)$",
     r"layers.\1.ffn.down_proj"),
]  # fmt: skip
_FALCON_H1_RENAMES = [
    *_JAMBA_RENAMES[:4],  # the embedding, the final norm and a layer's two norms are named as Jamba's
    (r"^model\.layers\.(\d+)\.mamba\.", r"layers.\1.mixer.mamba."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"layers.\1.mixer.attn."),
    _JAMBA_RENAMES[-1],  # the MLP
]
_ZAMBA2_RENAMES = [
    *_JAMBA_RENAMES[:2],  # the embedding and the final norm
    (r"^model\.layers\.(\d+)\.(?:mamba_decoder\.)?mamba\.", r"layers.\1.mixer."),
    (r"^model\.layers\.(\d+)\.(?:mamba_decoder\.)?input_layernorm\.", r"layers.\1.norm."),
    (r"^model\.layers\.(\d+)\.linear\.", r"layers.\1.linear."),
]
# inside a shared block (`model.layers.<i>.shared_transformer.` -> `shared.<block>.`)
_ZAMBA2_SHARED = [
    (r"^input_layernorm\.", "norm."),
    (r"^self_attn\.linear_([qkv])_adapter_list\.(\d+)\.", r"attn.\1_adapters.\2."),
    (r"^self_attn\.", "attn."),
    (r"^pre_ff_layernorm\.", "ffn_norm."),
    (r"^feed_forward\.gate_up_proj_adapter_list\.(\d+)\.", r"ffn.adapters.\1."),
    (r"^feed_forward\.", "ffn."),
]
_ZAMBA2_BLOCK = re.compile(r"^model\.layers\.(\d+)\.shared_transformer\.")


def _zamba2_key(key: str, config: LMConfig | None) -> str:
    """Zamba2 keys; a shared block's, saved under (any of) the layers that use it, go to `shared.<block>`."""
    if (m := _ZAMBA2_BLOCK.match(key)) and config is not None and int(m[1]) in config.shared_layers:
        block = config.shared_layers.index(int(m[1])) % config.shared_blocks
        return f"shared.{block}." + _first_rename(key[m.end() :], _ZAMBA2_SHARED)
    return _first_rename(key, _ZAMBA2_RENAMES)


def _first_rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key, hits = re.subn(pattern, repl, key)
        if hits:
            break
    return key


_SSM_RENAMES = [(r"^backbone\.embeddings?\.", "embedding."), (r"^backbone\.", "")]
_EXPERT = re.compile(r"^(layers\.\d+\.ffn)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


_NEMOTRON_BLOCK = re.compile(r"^(?:backbone|model)\.layers\.(\d+)\.(norm|mixer)\.")


_NEMOTRON_MOE = [
    (r"^gate\.weight$", "router.weight"),
    (r"^gate\.e_score_correction_bias$", "router_bias"),
    (r"^experts\.(up_proj|down_proj)$", r"\1"),  # transformers' stacked experts
    (r"^shared_experts\.", "shared."),
]


def _nemotron_key(key: str, config: LMConfig | None) -> str:
    """Nemotron-H keys: a block's norm and mixer are our layer's norm and mixer, or, for an MLP or expert
    block, its ffn_norm and ffn (per-expert hub keys keep an intermediate name, see `stack_experts`)."""
    if m := _NEMOTRON_BLOCK.match(key):
        i = int(m[1])
        alone = config is not None and i < len(config.mixers) and config.mixers[i] == "none"
        part = {"norm": "ffn_norm", "mixer": "ffn"}[m[2]] if alone else m[2]
        rest = key[m.end() :]
        if alone and config.ffns[i] == "moe":
            for pattern, repl in _NEMOTRON_MOE:
                rest, hits = re.subn(pattern, repl, rest)
                if hits:
                    break
        return f"layers.{i}.{part}." + rest
    key = re.sub(r"^(?:backbone|model)\.embeddings?\.", "embedding.", key)
    return re.sub(r"^(?:backbone|model)\.", "", key)


def rename_keys(keys, layout: str, config: LMConfig | None = None) -> dict[str, str]:
    """Our key for each checkpoint key (per-expert Jamba keys keep an intermediate name). Nemotron-H's
    need the `config` (which blocks are MLP blocks)."""
    if layout == "nemotron_h":
        return {key: _nemotron_key(key, config) for key in keys}
    if layout == "zamba2":
        return {key: _zamba2_key(key, config) for key in keys}
    rules = {
        "jamba": _JAMBA_RENAMES,
        "bamba": _JAMBA_RENAMES,
        "granitemoehybrid": _GRANITE_RENAMES,
        "falcon_h1": _FALCON_H1_RENAMES,
    }.get(layout, _SSM_RENAMES)
    out = {}
    for key in keys:
        new = _first_rename(key, rules)
        # Granite's shared MLP: the layer's MLP when dense, the MoE's `shared` beside experts
        out[key] = new.replace(".SHARED.", ".shared." if config is not None and config.d_shared_ffn else ".")
    return out


def stack_experts(sd: dict[str, torch.Tensor], n_experts: int, where: str) -> dict[str, torch.Tensor]:
    """Per-expert weights (Jamba's and Nemotron-H's hub layouts) -> stacked gate_up_proj [E, 2F, H] (or
    up_proj [E, F, H] for experts without a gate) and down_proj [E, H, F]."""
    groups: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out = {}
    for key, value in sd.items():
        if m := _EXPERT.match(key):
            groups.setdefault(m[1], {})[(int(m[2]), m[3])] = value
        else:
            out[key] = value
    for prefix, parts in groups.items():
        gated = any(p == "gate_proj" for _, p in parts)  # SwiGLU experts, or squared ReLU (up, down)
        names = ("gate_proj", "up_proj", "down_proj") if gated else ("up_proj", "down_proj")
        want = [(e, p) for e in range(n_experts) for p in names]
        if missing := [f"{prefix}.experts.{e}.{p}.weight" for e, p in want if (e, p) not in parts]:
            raise CheckpointError(
                f"{where}: missing expert weights {missing[:6]} (config: {n_experts} experts)"
            )
        if extra := sorted({e for e, _ in parts} - set(range(n_experts))):
            raise CheckpointError(f"{where}: {prefix} has experts {extra} beyond the config's {n_experts}")
        try:
            if gated:
                out[f"{prefix}.gate_up_proj"] = torch.stack(
                    [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(n_experts)]
                )
            else:
                out[f"{prefix}.up_proj"] = torch.stack([parts[(e, "up_proj")] for e in range(n_experts)])
            out[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(n_experts)])
        except RuntimeError as e:
            raise CheckpointError(f"{where}: the experts of {prefix} differ in shape ({e})") from e
    return out
