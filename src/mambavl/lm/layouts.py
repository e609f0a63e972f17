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

from mambavl.checkpoints.files import CheckpointError
from mambavl.lm.config import LMConfig, pad_vocab
from mambavl.ops.timestep import NO_LIMIT


def _auto_rank(value, d_model: int) -> int:
    return math.ceil(d_model / 16) if value in (None, "auto") else int(value)


def _limit(value) -> tuple[float, float]:
    """A time_step_limit pair; transformers ≥ 5 writes infinity as {"__float__": "Infinity"}."""

    def num(v):
        return float(v["__float__"] if isinstance(v, dict) else v)

    return tuple(num(v) for v in value)


def _require(source: Path, key: str, value, allowed) -> None:
    if value not in allowed:
        raise CheckpointError(
            f"{source}: {key}={value!r} is not supported; mambavl implements {key} in {list(allowed)}"
        )


def _hf_mamba(raw: dict, source: Path) -> LMConfig:
    falcon = raw["model_type"] == "falcon_mamba"
    _require(source, "hidden_act", raw.get("hidden_act", "silu"), ["silu"])
    d_model = raw.get("hidden_size", 768)
    expand = raw.get("expand", 2)
    return LMConfig(
        family=raw["model_type"],
        d_model=d_model,
        n_layer=raw.get("num_hidden_layers", 32),
        vocab_size=raw.get("vocab_size", 50280),
        d_state=raw.get("state_size", 16),
        d_conv=raw.get("conv_kernel", 4),
        expand=expand,
        # FalconMamba-7B's config says expand 16 yet intermediate_size 8192: the weights have the latter.
        d_inner=raw.get("intermediate_size") or expand * d_model,
        conv_bias=raw.get("use_conv_bias", True),
        proj_bias=raw.get("use_bias", False),
        dt_rank=_auto_rank(raw.get("time_step_rank", "auto"), d_model),
        bcdt_norm="weightless" if falcon else None,
        bcdt_eps=raw.get("mixer_rms_eps", 1e-6),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        tie_embeddings=raw.get("tie_word_embeddings", True),
        extra=raw,
    )


def _hf_mamba2(raw: dict, source: Path) -> LMConfig:
    _require(source, "hidden_act", raw.get("hidden_act", "silu"), ["silu"])
    d_model = raw.get("hidden_size", 4096)
    d_inner = raw.get("expand", 2) * d_model
    heads, headdim = raw.get("num_heads", 128), raw.get("head_dim", 64)
    if heads * headdim != d_inner:
        raise CheckpointError(
            f"{source}: num_heads {heads} × head_dim {headdim} must equal expand × hidden_size = {d_inner}"
        )
    eps = raw.get("layer_norm_epsilon", 1e-5)
    return LMConfig(
        family="mamba2",
        default_mixer="mamba2",
        d_model=d_model,
        n_layer=raw.get("num_hidden_layers", 64),
        vocab_size=raw.get("vocab_size", 32768),
        d_state=raw.get("state_size", 128),
        d_conv=raw.get("conv_kernel", 4),
        d_inner=d_inner,
        headdim=headdim,
        ngroups=raw.get("n_groups", 8),
        chunk_size=raw.get("chunk_size", 256),
        dt_limit=_limit(raw.get("time_step_limit", NO_LIMIT)),
        conv_bias=raw.get("use_conv_bias", True),
        proj_bias=raw.get("use_bias", False),
        gated_norm_eps=eps,
        norm_eps=eps,
        residual_in_fp32=raw.get("residual_in_fp32", True),
        tie_embeddings=raw.get("tie_word_embeddings", False),
        extra=raw,
    )


def _hf_jamba(raw: dict, source: Path) -> LMConfig:
    _require(source, "hidden_act", raw.get("hidden_act", "silu"), ["silu"])
    n = raw.get("num_hidden_layers", 32)
    d_model = raw.get("hidden_size", 4096)
    ap, ao = raw.get("attn_layer_period", 8), raw.get("attn_layer_offset", 4)
    ep, eo = raw.get("expert_layer_period", 2), raw.get("expert_layer_offset", 1)
    experts = raw.get("num_experts", 16)
    heads = raw.get("num_attention_heads", 32)
    eps = raw.get("rms_norm_eps", 1e-6)
    return LMConfig(
        family="jamba",
        d_model=d_model,
        n_layer=n,
        vocab_size=raw.get("vocab_size", 65536),
        mixers=tuple("attention" if i % ap == ao else "mamba1" for i in range(n)),
        ffns=tuple("moe" if experts > 1 and i % ep == eo else "mlp" for i in range(n)),
        d_state=raw.get("mamba_d_state", 16),
        d_conv=raw.get("mamba_d_conv", 4),
        expand=raw.get("mamba_expand", 2),
        dt_rank=_auto_rank(raw.get("mamba_dt_rank", "auto"), d_model),
        conv_bias=raw.get("mamba_conv_bias", True),
        proj_bias=raw.get("mamba_proj_bias", False),
        bcdt_norm="weighted",
        bcdt_eps=eps,
        n_heads=heads,
        n_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or d_model // heads,
        d_ffn=raw.get("intermediate_size", 14336),
        n_experts=experts,
        top_k=raw.get("num_experts_per_tok", 2),
        norm_eps=eps,
        residual_in_fp32=False,
        tie_embeddings=raw.get("tie_word_embeddings", False),
        extra=raw,
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


def _mamba_ssm(raw: dict, source: Path) -> LMConfig:
    ssm = dict(raw.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    _require(source, "ssm_cfg.layer", layer, list(MAMBA_SSM_DEFAULTS))
    _require(source, "d_intermediate", raw.get("d_intermediate", 0), [0])
    _require(source, "attn_layer_idx", list(raw.get("attn_layer_idx") or []), [[]])
    _require(source, "rms_norm", raw.get("rms_norm", True), [True])
    _require(source, "ssm_cfg.activation", ssm.get("activation", "silu"), ["silu", "swish"])
    o = {**MAMBA_SSM_DEFAULTS[layer], **ssm}
    d_model = raw["d_model"]
    if o.get("d_ssm") not in (None, o["expand"] * d_model):
        raise CheckpointError(f"{source}: ssm_cfg.d_ssm={o['d_ssm']} (a partial SSM) is not supported")
    common = dict(
        d_model=d_model,
        n_layer=raw["n_layer"],
        vocab_size=pad_vocab(raw["vocab_size"], raw.get("pad_vocab_size_multiple", 8)),
        d_state=o["d_state"],
        d_conv=o["d_conv"],
        expand=o["expand"],
        conv_bias=o["conv_bias"],
        proj_bias=o["bias"],
        norm_eps=raw.get("norm_epsilon", 1e-5),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        tie_embeddings=raw.get("tie_embeddings", True),
        extra=raw,
    )
    if layer == "Mamba1":
        return LMConfig(family="mamba", dt_rank=_auto_rank(o["dt_rank"], d_model), **common)
    return LMConfig(
        family="mamba2",
        default_mixer="mamba2",
        headdim=o["headdim"],
        ngroups=o["ngroups"],
        chunk_size=o["chunk_size"],
        dt_limit=_limit(o["dt_limit"]),
        gated_norm=o["rmsnorm"],
        norm_before_gate=o["norm_before_gate"],
        d_has_hdim=o["D_has_hdim"],
        gated_norm_eps=1e-5,
        **common,
    )


HF_LAYOUTS = {"mamba": _hf_mamba, "falcon_mamba": _hf_mamba, "mamba2": _hf_mamba2, "jamba": _hf_jamba}


def lm_config_from_json(raw: dict, source: Path) -> tuple[LMConfig, str]:
    """The LMConfig of a config.json and the layout name ('mamba_ssm' or the HF model_type)."""
    model_type = raw.get("model_type")
    try:
        if model_type is None and "d_model" in raw and "n_layer" in raw:
            return _mamba_ssm(raw, source), "mamba_ssm"
        if model_type in HF_LAYOUTS:
            return HF_LAYOUTS[model_type](raw, source), model_type
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: invalid language-model config ({type(e).__name__}: {e})") from e
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
_SSM_RENAMES = [(r"^backbone\.embeddings?\.", "embedding."), (r"^backbone\.", "")]
_EXPERT = re.compile(r"^(layers\.\d+\.ffn)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def rename_keys(keys, layout: str) -> dict[str, str]:
    """Our key for each checkpoint key (per-expert Jamba keys keep an intermediate name)."""
    rules = _JAMBA_RENAMES if layout == "jamba" else _SSM_RENAMES
    out = {}
    for key in keys:
        new = key
        for pattern, repl in rules:
            new, hits = re.subn(pattern, repl, new)
            if hits:
                break
        out[key] = new
    return out


def stack_experts(sd: dict[str, torch.Tensor], n_experts: int, where: str) -> dict[str, torch.Tensor]:
    """Per-expert Jamba weights (hub layout) -> stacked gate_up_proj [E, 2F, H] and down_proj [E, H, F]."""
    groups: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out = {}
    for key, value in sd.items():
        if m := _EXPERT.match(key):
            groups.setdefault(m[1], {})[(int(m[2]), m[3])] = value
        else:
            out[key] = value
    for prefix, parts in groups.items():
        want = [(e, p) for e in range(n_experts) for p in ("gate_proj", "up_proj", "down_proj")]
        if missing := [f"{prefix}.experts.{e}.{p}.weight" for e, p in want if (e, p) not in parts]:
            raise CheckpointError(
                f"{where}: missing expert weights {missing[:6]} (config: {n_experts} experts)"
            )
        if extra := sorted({e for e, _ in parts} - set(range(n_experts))):
            raise CheckpointError(f"{where}: {prefix} has experts {extra} beyond the config's {n_experts}")
        try:
            out[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(n_experts)]
            )
            out[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(n_experts)])
        except RuntimeError as e:
            raise CheckpointError(f"{where}: the experts of {prefix} differ in shape ({e})") from e
    return out
