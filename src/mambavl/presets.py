"""Named VLMs: the released systems and tiny variants of each (same code paths, toy sizes, a built-in
byte tokenizer) that run anywhere without the network. A preset is data: a `VLMConfig` row."""

from __future__ import annotations

from dataclasses import dataclass

from mambavl.lm.config import LMConfig
from mambavl.lm.layouts import lm_config_from_json
from mambavl.vision.anyres import grid_pinpoints
from mambavl.vlm.config import VLMConfig
from mambavl.vlm.prompts import CHATML_TEMPLATE


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

# Viper's LMs (transformers configs, as on the hub) and AnyRes grids (its training code: x, y ≤ 15, x·y ≤ 16)
FALCON_MAMBA_7B = lm_config_from_json(
    dict(
        model_type="falcon_mamba",
        hidden_size=4096,
        num_hidden_layers=64,
        state_size=16,
        expand=16,
        intermediate_size=8192,
        time_step_rank=256,
        vocab_size=65024,
        tie_word_embeddings=False,
    ),
    "preset",
)[0]
JAMBA_1_5_MINI = lm_config_from_json(
    dict(
        model_type="jamba",
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_experts=16,
        num_experts_per_tok=2,
        mamba_d_state=16,
        mamba_expand=2,
        mamba_dt_rank=256,
        vocab_size=65536,
        tie_word_embeddings=False,
    ),
    "preset",
)[0]
TINY_FALCON_MAMBA = lm_config_from_json(
    dict(model_type="falcon_mamba", hidden_size=64, num_hidden_layers=2, state_size=8, vocab_size=264),
    "preset",
)[0]
TINY_JAMBA = lm_config_from_json(
    dict(
        model_type="jamba",
        hidden_size=64,
        num_hidden_layers=4,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=8,
        vocab_size=264,
    ),
    "preset",
)[0]
# A dense Nemotron-H hybrid (Mamba-2, attention and squared-ReLU MLP blocks), tiny: the Cobra recipe on it.
TINY_NEMOTRON_H = lm_config_from_json(
    dict(
        model_type="nemotron_h",
        hidden_size=64,
        hybrid_override_pattern="M-*-M-",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        mamba_num_heads=8,
        mamba_head_dim=16,
        n_groups=2,
        ssm_state_size=16,
        chunk_size=32,
        vocab_size=264,
    ),
    "preset",
)[0]
# Nemotron-H 8B (nvidia/Nemotron-H-8B-Base-8K: 24 Mamba-2, 4 attention and 24 squared-ReLU MLP blocks), at
# full size: the hybrid the decode benchmark measures, and the Cobra recipe's LM on a hybrid.
NEMOTRON_H_8B = lm_config_from_json(
    dict(
        model_type="nemotron_h",
        hidden_size=4096,
        hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=21504,
        mamba_num_heads=128,
        mamba_head_dim=64,
        n_groups=8,
        ssm_state_size=128,
        chunk_size=128,
        vocab_size=131072,
        max_position_embeddings=8192,
    ),
    "preset",
)[0]
# Falcon-H1 (Mamba-2 and attention side by side in every layer, µP multipliers), tiny: the Cobra recipe on it.
TINY_FALCON_H1 = lm_config_from_json(
    dict(
        model_type="falcon_h1",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_n_groups=2,
        mamba_d_state=16,
        mamba_chunk_size=32,
        mamba_rms_norm=True,
        embedding_multiplier=2.0,
        lm_head_multiplier=0.5,
        ssm_multipliers=[1.0, 1.0, 0.5, 0.5, 1.0],
        vocab_size=264,
    ),
    "preset",
)[0]
TINY_ZAMBA2 = lm_config_from_json(
    dict(
        model_type="zamba2",
        hidden_size=64,
        num_hidden_layers=4,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
        num_mem_blocks=1,
        use_shared_attention_adapter=True,
        adapter_rank=8,
        use_mem_rope=True,
        num_attention_heads=4,
        intermediate_size=128,
        mamba_d_state=16,
        n_mamba_heads=4,
        chunk_size=32,
        vocab_size=264,
    ),
    "preset",
)[0]
VIPER_SYSTEM = "You are a helpful language and vision assistant. "
_VIPER = dict(
    tower="clip-vit-l-336px",
    projector="linear",
    prompt_format="chat-template",
    system_prompt=VIPER_SYSTEM,
    image_placement="placeholder",
    anyres=tuple(grid_pinpoints(336, 16, max_side=15)),
    image_newline=True,
    max_length=32768,
)
_TINY_VIPER = _VIPER | dict(
    tower="tiny-clip",
    tokenizer="bytes",
    chat_template=CHATML_TEMPLATE,
    eos_token="<|im_end|>",  # ChatML ends a turn with it (one id of the byte tokenizer)
    anyres=tuple(grid_pinpoints(56, 4)),
    max_length=4096,
)

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
        lm_hub_id="xiuyul/mamba-2.8b-zephyr",
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
        lm_hub_id="state-spaces/mamba2-2.7b",
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
    "viper-mamba-7b": VLMConfig(
        name="viper-mamba-7b",
        lm=FALCON_MAMBA_7B,
        tokenizer="tiiuae/falcon-mamba-7b-instruct",
        eos_token="<|im_end|>",
        lm_hub_id="tiiuae/falcon-mamba-7b-instruct",
        **_VIPER,
    ),
    "viper-jamba-52b": VLMConfig(
        name="viper-jamba-52b",
        lm=JAMBA_1_5_MINI,
        tokenizer="ai21labs/AI21-Jamba-1.5-Mini",
        eos_token="<|eom|>",
        lm_hub_id="ai21labs/AI21-Jamba-1.5-Mini",
        **_VIPER,
    ),
    "tiny-viper-mamba": VLMConfig(name="tiny-viper-mamba", lm=TINY_FALCON_MAMBA, **_TINY_VIPER),
    "tiny-viper-jamba": VLMConfig(name="tiny-viper-jamba", lm=TINY_JAMBA, **_TINY_VIPER),
    "tiny-cobra-nemotron-h": VLMConfig(  # Cobra's towers and projector on a hybrid Nemotron-H LM
        name="tiny-cobra-nemotron-h",
        tower="tiny-dinosiglip",
        projector="fused-gelu-mlp",
        lm=TINY_NEMOTRON_H,
        tokenizer="bytes",
    ),
    "cobra-nemotron-h-8b": VLMConfig(  # Cobra's towers and projector on Nemotron-H 8B
        name="cobra-nemotron-h-8b",
        tower="dinosiglip-vit-so-384px",
        projector="fused-gelu-mlp",
        lm=NEMOTRON_H_8B,
        tokenizer="nvidia/Nemotron-H-8B-Base-8K",
        prompt_format="chat-template",  # a base LM: the finetune teaches it ChatML turns
        chat_template=CHATML_TEMPLATE,
        eos_token="</s>",  # the Nemotron base tokenizers' end of text
        lm_hub_id="nvidia/Nemotron-H-8B-Base-8K",
        max_length=8192,
    ),
    # NVIDIA's Nemotron Omni recipe, tiny: C-RADIO at each image's own size, pixel shuffle, the
    # RMSNorm-ReLU² projector, a Nemotron-H LM, <img> … </img> around the image at the prompt's <image>.
    "tiny-nemotron-omni": VLMConfig(
        name="tiny-nemotron-omni",
        tower="tiny-radio",
        projector="rmsnorm-relu2-mlp",
        projector_options={"hidden": 48},
        lm=TINY_NEMOTRON_H,
        tokenizer="bytes",
        prompt_format="chat-template",
        chat_template=CHATML_TEMPLATE,
        eos_token="<|im_end|>",
        resize="dynamic",
        image_placement="placeholder",
        image_wrap=("<img>", "</img>"),
        max_length=4096,
    ),
    "tiny-cobra-falcon-h1": VLMConfig(  # Cobra's towers and projector on a Falcon-H1 LM
        name="tiny-cobra-falcon-h1",
        tower="tiny-dinosiglip",
        projector="fused-gelu-mlp",
        lm=TINY_FALCON_H1,
        tokenizer="bytes",
    ),
    "tiny-cobra-zamba2": VLMConfig(  # Cobra's towers and projector on a Zamba2 LM (shared attention blocks)
        name="tiny-cobra-zamba2",
        tower="tiny-dinosiglip",
        projector="fused-gelu-mlp",
        lm=TINY_ZAMBA2,
        tokenizer="bytes",
    ),
}


# ---- released models read from their own hub files (their config is the hub's config.json) -------------
# name -> (hub id, layout). The id is the one transformers' nemotron_h_omni names as its checkpoint.
HUB_MODELS: dict[str, tuple[str, str]] = {
    "nemotron-3-nano-omni": ("nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16", "nemotron"),
}


# ---- the seeds' model registries ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Release:
    """A released model as Cobra's / ML-Mamba's registry lists it: what `mambavl.available_model_names`,
    `get_model_description` and `vlm.arch_specifier` answer for it."""

    display_name: str  # the registry's second name, accepted by `load` wherever the id is
    arch_specifier: str  # the released run config's: training stage + projector
    description: dict  # the registry's fields, so that scripts reading one keep working


DINOSIGLIP_384 = "DINOv2 ViT-L/14 + SigLIP ViT-SO/14 @ 384px"
LLAVA_LVIS4V_LRV = ["LLaVa v1.5 Instruct", "LVIS-Instruct-4V", "LRV-Instruct"]
RELEASES: dict[str, Release] = {
    "cobra+3b": Release(
        "Cobra-DINOSigLIP 3B",
        "no-align+fused-gelu-mlp",
        dict(
            name="Cobra 3B",
            optimization_procedure="single-stage",
            visual_representation=DINOSIGLIP_384,
            image_processing="Naive Resize",
            language_model="Mamba 2.8B Zephyr",
            datasets=LLAVA_LVIS4V_LRV,
            train_epochs=2,
        ),
    ),
    # ML-Mamba's released run config says fused-gelu-mlp; its connector is the MSC all the same (our
    # loader tells it from the checkpoint's groups).
    "mlmamba+3b": Release(
        "MLMamba-DINOSigLIP 3B",
        "no-align+fused-gelu-mlp",
        dict(
            name="ML-Mamba 3B",
            optimization_procedure="single-stage",
            visual_representation=DINOSIGLIP_384,
            image_processing="Naive Resize",
            language_model="Mamba-2 2.7B",  # their registry repeats Cobra's LM; the weights are Mamba-2's
            datasets=LLAVA_LVIS4V_LRV,
            train_epochs=None,  # their registry says 2, their released run config 1
        ),
    ),
}


def is_tiny(preset: str) -> bool:
    """Tiny presets: toy sizes, no released weights; they run anywhere with random or trained weights."""
    return preset in PRESETS and preset.startswith("tiny-")
