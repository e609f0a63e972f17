"""Weights written in the other layouts users have on disk load to the same logits: mamba_ssm's original
layout (Cobra's and ML-Mamba's LMs), sharded safetensors, pytorch_model.bin, and the HF cache."""

import json
from pathlib import Path

import pytest
import torch

import refmodels
from mambavl.lm import load_lm


def write_mamba_ssm(ref, directory: Path, config: dict) -> Path:
    """The layout of mamba_ssm's `MambaLMHeadModel.save_pretrained`: config.json without model_type,
    pytorch_model.bin with `backbone.embedding.weight` and the tied `lm_head.weight` both present."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in ref.state_dict().items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    torch.save(sd, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def mamba_ssm_config(d_model, n_layer, vocab, multiple, ssm_cfg):
    return {
        "d_model": d_model,
        "d_intermediate": 0,
        "n_layer": n_layer,
        "vocab_size": vocab,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": multiple,
        "tie_embeddings": True,
    }


@torch.no_grad()
def test_mamba1_original_layout(tmp_path):
    # vocab 101 padded to a multiple of 8 = 104 rows, as mamba_ssm does for 50277 -> 50280
    ref = refmodels.perturb(
        refmodels.tf.MambaForCausalLM(
            refmodels.tf.MambaConfig(vocab_size=104, hidden_size=32, state_size=16, num_hidden_layers=2)
        )
    )
    path = write_mamba_ssm(ref, tmp_path / "m1", mamba_ssm_config(32, 2, 101, 8, {}))
    lm = load_lm(path)
    assert lm.config.vocab_size == 104 and lm.config.family == "mamba"
    ids = torch.randint(0, 101, (2, 29))
    assert (lm(ids) - ref(ids).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_mamba2_original_layout(tmp_path):
    ref = refmodels.perturb(
        refmodels.tf.Mamba2ForCausalLM(
            refmodels.tf.Mamba2Config(
                vocab_size=112,
                hidden_size=32,
                state_size=8,
                num_hidden_layers=2,
                num_heads=8,
                head_dim=8,
                n_groups=1,
                chunk_size=16,
                tie_word_embeddings=True,
            )
        )
    )
    ssm_cfg = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 16, "ngroups": 1}
    path = write_mamba_ssm(ref, tmp_path / "m2", mamba_ssm_config(32, 2, 101, 16, ssm_cfg))
    lm = load_lm(path)
    assert lm.config.vocab_size == 112 and lm.config.mixers == ("mamba2", "mamba2")
    ids = torch.randint(0, 101, (1, 40))
    assert (lm(ids) - ref(ids).logits).abs().max() <= 1e-4


def test_mamba_ssm_features_we_do_not_implement_are_refused(tmp_path):
    ref = refmodels.make("mamba-tied-bias-rank5")
    cfg = mamba_ssm_config(48, 3, 64, 8, {})
    cfg["attn_layer_idx"] = [1]
    path = write_mamba_ssm(ref, tmp_path / "attn", cfg)
    with pytest.raises(ValueError, match="attn_layer_idx"):
        load_lm(path)


@torch.no_grad()
@pytest.mark.parametrize("name", ["jamba-attn-moe-gqa", "mamba2-groups2-untied"])
def test_sharded_safetensors_and_bin(tmp_path, name):
    ref = refmodels.make(name)
    ids = torch.randint(0, 75, (1, 21))
    want = ref(ids).logits
    sharded = refmodels.save(ref, tmp_path / "sharded", max_shard_size="20KB")
    assert (Path(sharded) / "model.safetensors.index.json").is_file()
    assert (load_lm(sharded)(ids) - want).abs().max() <= 1e-4
    # a single pytorch_model.bin, as older checkpoints ship
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "config.json").write_text((Path(sharded) / "config.json").read_text())
    torch.save(load_sd(Path(sharded)), bindir / "pytorch_model.bin")
    assert (load_lm(bindir)(ids) - want).abs().max() <= 1e-4


def load_sd(directory: Path) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(directory.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


@torch.no_grad()
def test_jamba_fused_expert_keys(tmp_path):
    """transformers >= 5 keeps experts stacked in memory; such a state dict loads too."""
    ref = refmodels.make("jamba-attn-moe-gqa")
    path = Path(refmodels.save(ref, tmp_path / "j"))
    sd = load_sd(path)
    for i in (1, 3):
        p = f"model.layers.{i}.feed_forward.experts"
        gate_up = [
            torch.cat([sd.pop(f"{p}.{e}.gate_proj.weight"), sd.pop(f"{p}.{e}.up_proj.weight")])
            for e in range(4)
        ]
        sd[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.down_proj.weight") for e in range(4)])
    for f in path.glob("*.safetensors"):
        f.unlink()
    from safetensors.torch import save_file

    save_file(sd, path / "model.safetensors")
    ids = torch.randint(0, 101, (2, 15))
    assert (load_lm(path)(ids) - ref(ids).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_hub_id_is_resolved_from_the_local_cache(tmp_path, monkeypatch):
    """A hub id already in the HF cache loads offline (the cache is looked at before the network)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-mamba" / "snapshots" / ("0" * 40)
    ref = refmodels.make("mamba-untied-conv3-vocab101")
    refmodels.save(ref, snapshot)
    (cache / "models--acme--tiny-mamba" / "refs").mkdir()
    (cache / "models--acme--tiny-mamba" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    lm = load_lm("acme/tiny-mamba")
    ids = torch.randint(0, 101, (1, 9))
    assert (lm(ids) - ref(ids).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_dtype_and_device_arguments(tmp_path):
    path = refmodels.save(refmodels.make("mamba2-groups2-untied"), tmp_path / "m")
    lm = load_lm(path, dtype=torch.bfloat16, device="cpu")
    assert lm.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in lm.parameters())
    assert not any(p.is_meta for p in lm.parameters())
    assert load_lm(path).dtype == torch.float32  # None keeps the checkpoint's dtype


@torch.no_grad()
def test_mamba2_options_without_a_transformers_counterpart(tmp_path):
    """mamba_ssm's Mamba2(rmsnorm=False, D_has_hdim=True): z gates inside the scan, D per channel.
    Loaded from the original layout; decoding from the state equals the full forward."""
    from mambavl.lm import LanguageModel
    from mambavl.lm.layouts import lm_config_from_json

    ssm_cfg = {
        "layer": "Mamba2",
        "d_state": 8,
        "headdim": 8,
        "chunk_size": 8,
        "rmsnorm": False,
        "D_has_hdim": True,
    }
    raw = mamba_ssm_config(32, 2, 60, 16, ssm_cfg)
    cfg, _ = lm_config_from_json(raw, "config.json")
    model = refmodels.perturb(LanguageModel(cfg))
    assert model.layers[0].mixer.norm is None and model.layers[0].mixer.D.shape == (64,)
    directory = tmp_path / "m"
    directory.mkdir()
    sd = {("backbone." + k if not k.startswith("lm_head") else k): v for k, v in model.state_dict().items()}
    torch.save(sd, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(raw))
    lm = load_lm(directory)
    ids = torch.randint(0, 60, (2, 19))
    full = lm(ids)
    torch.testing.assert_close(full, model(ids), atol=0, rtol=0)
    state = lm.new_state(2)
    steps = torch.cat(
        [lm(ids[:, :7], state=state)] + [lm(ids[:, t : t + 1], state=state) for t in range(7, 19)], 1
    )
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=0)


def test_every_layer_kind_has_its_module_and_its_properties():
    """The kinds registry (lm.config) and the modules (lm.model) name the same mixers and feed-forwards;
    what decoding needs to know (fixed-size state, static shapes) comes from the registry."""
    from mambavl.lm.config import FFN_KINDS, MIXER_KINDS, LMConfig
    from mambavl.lm.model import FFN_CLASSES, MIXER_CLASSES

    assert set(MIXER_CLASSES) | {"none"} == set(MIXER_KINDS)
    assert set(FFN_CLASSES) | {"none"} == set(FFN_KINDS)
    from mambavl.presets import TINY_JAMBA

    hybrid = TINY_JAMBA  # attention and mixture-of-experts layers among Mamba ones
    assert not hybrid.fixed_state and not hybrid.static_shapes
    plain = LMConfig(family="mamba", d_model=8, n_layer=2, vocab_size=16)
    assert plain.fixed_state and plain.static_shapes


def test_nemotron_h_block_patterns():
    """Nemotron-H's pattern (or block list) becomes a row of layer kinds, expert blocks with their routing;
    unknown letters, latent experts and groups that do not divide the experts are refused with errors naming
    the field."""
    import pytest

    from mambavl.checkpoints.files import CheckpointError
    from mambavl.lm.layouts import lm_config_from_json

    base = dict(
        model_type="nemotron_h", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        mamba_num_heads=8, mamba_head_dim=4, n_groups=2, ssm_state_size=8, intermediate_size=40,
        vocab_size=64,
    )  # fmt: skip
    cfg, layout = lm_config_from_json(base | {"hybrid_override_pattern": "M-*M"}, "config.json")
    assert layout == "nemotron_h" and cfg.n_layer == 4
    assert cfg.mixers == ("mamba2", "none", "attention", "mamba2")
    assert cfg.ffns == ("none", "mlp", "none", "none") and cfg.ffn_act == "relu2"
    listed, _ = lm_config_from_json(base | {"layers_block_type": ["mamba", "mlp", "attention", "mamba"]}, "c")
    assert listed.mixers == cfg.mixers and listed.ffns == cfg.ffns
    moe = base | dict(
        hybrid_override_pattern="ME", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=20, n_group=4, topk_group=2, routed_scaling_factor=2.5,
    )  # fmt: skip
    experts, _ = lm_config_from_json(moe, "config.json")
    assert experts.ffns == ("none", "moe") and experts.mixers == ("mamba2", "none")
    assert (experts.n_experts, experts.top_k, experts.d_expert_ffn, experts.d_shared_ffn) == (8, 2, 24, 20)
    assert (experts.moe_routing, experts.moe_groups, experts.moe_topk_groups) == ("sigmoid_grouped", 4, 2)
    with pytest.raises(CheckpointError, match="moe_latent_size"):
        lm_config_from_json(moe | {"moe_latent_size": 16}, "config.json")
    with pytest.raises(CheckpointError, match="moe_groups"):
        lm_config_from_json(moe | {"n_group": 3}, "config.json")
    with pytest.raises(CheckpointError, match="hybrid_override_pattern must be"):
        lm_config_from_json(base | {"hybrid_override_pattern": "MX"}, "config.json")
    with pytest.raises(CheckpointError, match="layers_block_type must be"):
        lm_config_from_json(base | {"layers_block_type": ["mamba", 3]}, "config.json")


def test_granite_h_layers_experts_and_hub_key_names():
    """Granite-4.0-H's layer list and experts become layer kinds; the hub's expert names (input_linear,
    output_linear, router.layer) and transformers' both map to ours; unknown layer kinds are refused."""
    import pytest

    from mambavl.checkpoints.files import CheckpointError
    from mambavl.lm.layouts import lm_config_from_json, rename_keys

    base = dict(model_type="granitemoehybrid", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                mamba_n_heads=4, shared_intermediate_size=8, intermediate_size=6, vocab_size=64)  # fmt: skip
    layers = {"layer_types": ["mamba", "attention"]}
    dense, _ = lm_config_from_json(base | layers | {"num_local_experts": 0}, "c")
    assert dense.mixers == ("mamba2", "attention") and dense.ffns == ("mlp", "mlp") and dense.d_ffn == 8
    moe, _ = lm_config_from_json(base | {"num_local_experts": 4, "num_experts_per_tok": 2}, "c")
    assert moe.ffns == ("moe", "moe") and (moe.d_ffn, moe.d_shared_ffn, moe.n_experts) == (6, 8, 4)
    layer = "model.layers.1."
    hub = [f"{layer}block_sparse_moe.{k}" for k in ("input_linear.weight", "output_linear.weight")]
    hub += [f"{layer}block_sparse_moe.router.layer.weight", f"{layer}shared_mlp.input_linear.weight"]
    assert list(rename_keys(hub, "granitemoehybrid", moe).values()) == [
        "layers.1.ffn.gate_up_proj", "layers.1.ffn.down_proj", "layers.1.ffn.router.weight",
        "layers.1.ffn.shared.gate_up_proj.weight",
    ]  # fmt: skip
    assert rename_keys(hub[3:], "granitemoehybrid", dense)[hub[3]] == "layers.1.ffn.gate_up_proj.weight"
    with pytest.raises(CheckpointError, match="layer_types must be"):
        lm_config_from_json(base | {"num_local_experts": 0, "layer_types": ["mamba", "conv"]}, "config.json")


@torch.no_grad()
def test_zamba2_shared_blocks_saved_under_every_use(tmp_path):
    """A Zamba2 checkpoint may hold a shared block's weights under each layer that uses it (a save without
    transformers' de-duplication of tied weights): equal copies load as the one block, and copies that
    differ are refused, naming both. Its layer list is checked field by field."""
    from safetensors.torch import load_file, save_file

    from mambavl.checkpoints.files import CheckpointError
    from mambavl.lm.layouts import lm_config_from_json

    ref = refmodels.make("zamba2-shared-adapters-rope")
    path = Path(refmodels.save(ref, tmp_path / "saved"))
    sd = load_file(path / "model.safetensors")
    # uses 0, 1, 2 sit in layers 1, 3, 4; blocks taken in turn: layer 4 runs block 0, as layer 1 does
    copies = {
        k.replace("layers.1.shared", "layers.4.shared"): v.clone()
        for k, v in sd.items()
        if "layers.1.shared" in k
    }
    save_file(sd | copies, path / "model.safetensors")
    ids = torch.randint(0, 101, (1, 11))
    torch.testing.assert_close(load_lm(path)(ids), ref(ids).logits, atol=1e-4, rtol=0)
    key = next(k for k in copies if k.endswith("q_proj.weight"))
    copies[key] = copies[key] + 1
    save_file(sd | copies, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.4\.shared_transformer\.self_attn\.q_proj.*differ"):
        load_lm(path)
    raw = json.loads((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="layers_block_type must be"):
        lm_config_from_json(raw | {"layers_block_type": ["mamba", "attention"] * 3}, "config.json")
    with pytest.raises(CheckpointError, match="num_attention_heads 5 does not divide"):
        lm_config_from_json(raw | {"num_attention_heads": 5}, "config.json")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_training_forward_pads_rows_to_sixteen_without_changing_anything(monkeypatch, backend):
    """A Mamba-1 model's training forward pads its rows to a multiple of 16 positions at the embedding
    (its training kernels' tiles): logits and every gradient equal an unpadded forward's."""
    if backend == "triton":
        pytest.importorskip("triton")
    import dataclasses

    import mambavl.lm.model as lm_model
    from mambavl.lm.model import LanguageModel
    from mambavl.presets import PRESETS

    monkeypatch.setenv("MAMBAVL_BACKEND", backend)
    cfg = dataclasses.replace(PRESETS["tiny-cobra"].lm, d_model=16, d_inner=32, dt_rank=2, d_state=4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = LanguageModel(cfg).to(device)
    assert lm._pads(21) and not lm._pads(32)
    ids = torch.randint(0, lm.config.vocab_size, (2, 21), device=device)

    def run():
        lm.zero_grad()
        logits = lm(ids)
        (logits.float().square().mean()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}

    padded_logits, padded_grads = run()
    monkeypatch.setattr(lm_model, "PAD_MULTIPLE", 1)
    assert not lm._pads(21)
    logits, grads = run()
    assert padded_logits.shape == logits.shape == (2, 21, lm.config.vocab_size)
    torch.testing.assert_close(padded_logits, logits, rtol=1e-5, atol=1e-5)
    assert padded_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(padded_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
