"""Named VLMs: the released systems and tiny variants of each (same code paths, toy sizes, a built-in
byte tokenizer) that run anywhere without the network. A preset is data: a `VLMConfig` row."""

from __future__ import annotations

import torch

from mambavl.lm.config import LMConfig
from mambavl.lm.layouts import lm_config_from_json
from mambavl.vlm.model import VLM, VLMConfig


def _mamba_ssm(**raw) -> LMConfig:
    return lm_config_from_json(raw, "preset")[0]


# The LMs' own configs (mamba_ssm layout), as on the hub.
MAMBA_2_8B_ZEPHYR = _mamba_ssm(
    d_model=2560, n_layer=64, vocab_size=50277, ssm_cfg={}, pad_vocab_size_multiple=8
)
MAMBA2_2_7B = _mamba_ssm(
    d_model=2560, n_layer=64, vocab_size=50277, ssm_cfg={"layer": "Mamba2"}, pad_vocab_size_multiple=16
)
GPT_NEOX_TOKENIZER = "xiuyul/mamba-2.8b-zephyr"  # Cobra and ML-Mamba both tokenize with it
TINY_MAMBA = _mamba_ssm(
    d_model=64, n_layer=2, vocab_size=257, ssm_cfg={"d_state": 8}, pad_vocab_size_multiple=8
)
TINY_MAMBA2 = _mamba_ssm(
    d_model=64,
    n_layer=2,
    vocab_size=257,
    ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 32},
    pad_vocab_size_multiple=16,
)


def msc_options(lm: LMConfig) -> dict:
    """ML-Mamba builds its connector's Mamba-2 blocks from the LM's own config (sizes only, no weights)."""
    keys = ("d_state", "headdim", "ngroups", "chunk_size", "expand", "d_conv")
    return {k: getattr(lm, k) for k in keys}


# The seeds' `llm_backbone_id`s (in their run configs) -> (LM config, tokenizer, prompt format).
LLM_BACKBONES: dict[str, tuple[LMConfig, str, str]] = {
    "mamba-2.8b-zephyr": (MAMBA_2_8B_ZEPHYR, GPT_NEOX_TOKENIZER, "zephyr"),
    "mamba2-2.7b": (MAMBA2_2_7B, GPT_NEOX_TOKENIZER, "zephyr"),
    "tiny-mamba": (TINY_MAMBA, "bytes", "zephyr"),
    "tiny-mamba2": (TINY_MAMBA2, "bytes", "zephyr"),
}

PRESETS: dict[str, VLMConfig] = {
    "cobra+3b": VLMConfig(
        name="cobra+3b",
        tower="dinosiglip-vit-so-384px",
        projector="fused-gelu-mlp",
        lm=MAMBA_2_8B_ZEPHYR,
        tokenizer=GPT_NEOX_TOKENIZER,
        prompt_format="zephyr",
        hub_id="han1997/cobra",
        hub_layout="cobra",
    ),
    "mlmamba+3b": VLMConfig(
        name="mlmamba+3b",
        tower="dinosiglip-vit-so-384px",
        projector="msc",
        projector_options=msc_options(MAMBA2_2_7B),
        lm=MAMBA2_2_7B,
        tokenizer=GPT_NEOX_TOKENIZER,
        prompt_format="zephyr",  # ML-Mamba's builder selector returns the zephyr builder for every mamba LM
        hub_id="huangwenjun1994/ML-Mamba",
        hub_layout="mlmamba",
    ),
    "tiny-cobra": VLMConfig(
        name="tiny-cobra",
        tower="tiny-dinosiglip",
        projector="fused-gelu-mlp",
        lm=TINY_MAMBA,
        tokenizer="bytes",
    ),
    "tiny-mlmamba": VLMConfig(
        name="tiny-mlmamba",
        tower="tiny-dinosiglip",
        projector="msc",
        projector_options=msc_options(TINY_MAMBA2),
        lm=TINY_MAMBA2,
        tokenizer="bytes",
    ),
}


def create(preset: str, device=None, dtype: torch.dtype | None = None) -> VLM:
    """A VLM of a named preset with random weights (`device="meta"` builds it without memory)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    with torch.device(device or "cpu"):
        vlm = VLM(PRESETS[preset])
    if dtype is not None:
        vlm = vlm.to(dtype)
    return vlm.eval()
