"""Tiny random transformers models of each family mambavl loads: the references of the LM tests.

Each case is small but not trivial: every parameter is perturbed away from its (often all-ones)
initial value, and between them the cases cover untied heads, conv widths other than 4, vocabularies
that are not multiples of 8, n_groups > 1, projection biases, Jamba's attention + MoE layers,
Nemotron-H's blocks of one kind each (Mamba-2, attention, squared-ReLU MLP), Falcon-H1's parallel
Mamba-2 and attention with its µP multipliers, and Zamba2's shared blocks with per-use adapters.
"""

from __future__ import annotations

import torch
import transformers as tf

# the tiny Nemotron-H's sizes: odd vocabulary, grouped B/C, grouped-query attention, short chunks
NEMOTRON_H_SIZES = dict(
    vocab_size=101, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    intermediate_size=40, mamba_num_heads=8, mamba_head_dim=4, n_groups=2, ssm_state_size=8, chunk_size=8,
    conv_kernel=3,
)  # fmt: skip

CASES = {
    "mamba-untied-conv3-vocab101": lambda: tf.MambaForCausalLM(
        tf.MambaConfig(
            vocab_size=101,
            hidden_size=32,
            state_size=8,
            num_hidden_layers=2,
            conv_kernel=3,
            tie_word_embeddings=False,
        )
    ),
    "mamba-tied-bias-rank5": lambda: tf.MambaForCausalLM(
        tf.MambaConfig(
            vocab_size=64,
            hidden_size=48,
            state_size=16,
            num_hidden_layers=3,
            time_step_rank=5,
            use_bias=True,
            use_conv_bias=False,
        )
    ),
    "falcon_mamba-conv5-vocab99": lambda: tf.FalconMambaForCausalLM(
        tf.FalconMambaConfig(
            vocab_size=99,
            hidden_size=32,
            state_size=8,
            num_hidden_layers=2,
            conv_kernel=5,
            tie_word_embeddings=False,
        )
    ),
    "mamba2-groups2-untied": lambda: tf.Mamba2ForCausalLM(
        tf.Mamba2Config(
            vocab_size=101,
            hidden_size=32,
            state_size=8,
            num_hidden_layers=2,
            num_heads=8,
            head_dim=8,
            n_groups=2,
            chunk_size=16,
        )
    ),
    "mamba2-groups4-conv2-tied": lambda: tf.Mamba2ForCausalLM(
        tf.Mamba2Config(
            vocab_size=75,
            hidden_size=32,
            state_size=16,
            num_hidden_layers=2,
            num_heads=16,
            head_dim=4,
            n_groups=4,
            chunk_size=8,
            conv_kernel=2,
            tie_word_embeddings=True,
        )
    ),
    "jamba-attn-moe-gqa": lambda: tf.JambaForCausalLM(
        tf.JambaConfig(
            vocab_size=101,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=4,
            num_experts_per_tok=2,
            mamba_d_state=8,
            mamba_dt_rank=4,
            mamba_expand=2,
            mamba_d_conv=3,
        )
    ),
    "jamba-dense-mha-tied": lambda: tf.JambaForCausalLM(
        tf.JambaConfig(
            vocab_size=90,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            attn_layer_period=3,
            attn_layer_offset=0,
            num_experts=1,
            mamba_d_state=4,
            mamba_expand=2,
            tie_word_embeddings=True,
        )
    ),
    "nemotron_h-hybrid-groups-gqa": lambda: tf.NemotronHForCausalLM(
        tf.NemotronHConfig(
            layers_block_type=[
                "linear_attention",
                "full_attention",
                "mlp",
                "linear_attention",
                "mlp",
                "full_attention",
            ],
            **NEMOTRON_H_SIZES,
        )
    ),
    "nemotron_h-moe-grouped-routing": lambda: _with_router_bias(
        tf.NemotronHForCausalLM(
            tf.NemotronHConfig(
                layers_block_type=["linear_attention", "moe", "full_attention", "moe", "mlp"],
                n_routed_experts=8,
                num_experts_per_tok=3,
                moe_intermediate_size=24,
                moe_shared_expert_intermediate_size=20,
                n_group=4,
                topk_group=2,
                norm_topk_prob=True,
                routed_scaling_factor=2.5,
                **NEMOTRON_H_SIZES,
            )
        )
    ),
    "bamba-rope-groups-gqa": lambda: tf.BambaForCausalLM(
        tf.BambaConfig(
            vocab_size=101,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=4,
            attn_layer_indices=[1, 3],
            num_attention_heads=4,
            num_key_value_heads=2,
            mamba_n_heads=8,
            mamba_n_groups=2,
            mamba_d_state=8,
            mamba_d_conv=3,
            mamba_expand=2,
            mamba_chunk_size=8,
        )
    ),
    "granite_h-dense-rope-multipliers": lambda: tf.GraniteMoeHybridForCausalLM(
        tf.GraniteMoeHybridConfig(
            vocab_size=101,
            hidden_size=32,
            num_hidden_layers=4,
            layer_types=["mamba", "attention", "mamba", "attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            shared_intermediate_size=40,
            num_local_experts=0,
            position_embedding_type="rope",
            embedding_multiplier=1.7,
            residual_multiplier=0.6,
            attention_multiplier=0.3,
            logits_scaling=2.5,
            mamba_n_heads=8,
            mamba_n_groups=2,
            mamba_d_state=8,
            mamba_d_conv=3,
            mamba_chunk_size=8,
        )
    ),
    "granite_h-moe-shared": lambda: tf.GraniteMoeHybridForCausalLM(
        tf.GraniteMoeHybridConfig(
            vocab_size=101,
            hidden_size=32,
            num_hidden_layers=3,
            layer_types=["mamba", "attention", "mamba"],
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=24,
            shared_intermediate_size=40,
            num_local_experts=4,
            num_experts_per_tok=2,
            residual_multiplier=0.7,
            mamba_n_heads=8,
            mamba_n_groups=2,
            mamba_d_state=8,
            mamba_chunk_size=8,
        )
    ),
    "granite_h-dense-nope-tied": lambda: tf.GraniteMoeHybridForCausalLM(
        tf.GraniteMoeHybridConfig(
            vocab_size=90,
            hidden_size=32,
            num_hidden_layers=3,
            layer_types=["mamba", "mamba", "attention"],
            num_attention_heads=2,
            shared_intermediate_size=24,
            num_local_experts=0,
            mamba_n_heads=4,
            mamba_d_state=4,
            tie_word_embeddings=True,
        )
    ),
    # Falcon-H1: Mamba-2 beside attention in every layer, every µP multiplier off 1, an SSM width of its
    # own (mamba_d_ssm), grouped B/C, grouped-query attention
    "falcon_h1-parallel-multipliers": lambda: tf.FalconH1ForCausalLM(
        tf.FalconH1Config(
            vocab_size=101,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            mamba_d_ssm=48,
            mamba_n_heads=6,
            mamba_n_groups=2,
            mamba_d_state=8,
            mamba_d_conv=3,
            mamba_chunk_size=8,
            embedding_multiplier=1.7,
            lm_head_multiplier=0.6,
            key_multiplier=1.3,
            attention_in_multiplier=0.8,
            attention_out_multiplier=1.2,
            ssm_in_multiplier=0.9,
            ssm_out_multiplier=1.1,
            ssm_multipliers=[0.5, 1.5, 0.7, 1.3, 0.9],
            mlp_multipliers=[1.4, 0.6],
        )
    ),
    # with the SSM's gated RMSNorm (the gate after the norm), a tied head, head_dim of its own
    "falcon_h1-rmsnorm-tied": lambda: tf.FalconH1ForCausalLM(
        tf.FalconH1Config(
            vocab_size=90,
            hidden_size=32,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=12,
            mamba_d_ssm=32,
            mamba_n_heads=4,
            mamba_n_groups=2,
            mamba_d_state=4,
            mamba_chunk_size=8,
            mamba_rms_norm=True,
            mamba_norm_before_gate=False,
            tie_word_embeddings=True,
            ssm_multipliers=[1.2, 0.8, 1.1, 0.9, 1.3],
        )
    ),
    # Zamba2: Mamba-2 layers, three of them fed by two shared attention + MLP blocks taken in turn, with
    # per-use q/k/v and MLP adapters, RoPE, grouped B/C, a conv of width 3
    "zamba2-shared-adapters-rope": lambda: tf.Zamba2ForCausalLM(
        tf.Zamba2Config(
            vocab_size=101,
            hidden_size=32,
            num_hidden_layers=6,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"],
            num_mem_blocks=2,
            use_shared_attention_adapter=True,
            adapter_rank=4,
            use_mem_rope=True,
            num_attention_heads=4,
            intermediate_size=40,
            mamba_d_state=8,
            mamba_d_conv=3,
            n_mamba_heads=8,
            mamba_ngroups=2,
            chunk_size=8,
        )
    ),
    # one shared block for every use, no q/k/v adapters, no positional encoding, grouped-query attention,
    # biases on the projections (add_bias_linear), SiLU (transformers ties the blocks' uses only with a
    # tied head: untied, its uses would be separate blocks, which Zamba2 is not)
    "zamba2-one-block-gqa-bias": lambda: tf.Zamba2ForCausalLM(
        tf.Zamba2Config(
            vocab_size=90,
            hidden_size=24,
            num_hidden_layers=4,
            layers_block_type=["hybrid", "mamba", "hybrid", "mamba"],
            num_mem_blocks=1,
            adapter_rank=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=30,
            hidden_act="silu",
            add_bias_linear=True,
            mamba_d_state=4,
            n_mamba_heads=6,
            chunk_size=8,
        )
    ),
}


@torch.no_grad()
def _with_router_bias(model):
    """Nemotron-H's expert score bias is a buffer (zeros at init, so `perturb` misses it): random, so that
    routing depends on it."""
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn_like(buf) * 0.5)
    return model


def make(name: str, seed: int = 0):
    """The reference model `name`, in eval mode, with every parameter perturbed."""
    torch.manual_seed(seed)
    return perturb(CASES[name]())


@torch.no_grad()
def perturb(model, scale: float = 0.05):
    """Move every parameter off its initial value (norm weights of 1, D of 1...), in eval mode."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * scale)
    return model.eval()


def save(model, directory, **kwargs) -> str:
    model.save_pretrained(str(directory), **kwargs)
    return str(directory)
