"""Bad checkpoints and bad inputs get errors that name the file, the key and what was expected;
nothing half-loads."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import refmodels
from mambavl.checkpoints import CheckpointError
from mambavl.lm import load_lm


@pytest.fixture
def saved(tmp_path) -> Path:
    return Path(refmodels.save(refmodels.make("mamba-untied-conv3-vocab101"), tmp_path / "model"))


def edit_config(path: Path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_directory():
    with pytest.raises(CheckpointError, match="no such directory"):
        load_lm("./does/not/exist")


def test_hub_id_offline_and_not_cached_says_so():
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_lm("acme/not-downloaded")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        load_lm(saved)


def test_unknown_model_type(saved):
    edit_config(saved, model_type="llama")
    with pytest.raises(CheckpointError, match=r"unknown model_type 'llama'.*falcon_mamba.*mamba2"):
        load_lm(saved)


def test_no_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights found.*model\.safetensors.*pytorch_model\.bin"):
        load_lm(saved)


def test_shape_mismatch_names_file_key_and_shapes(saved):
    edit_config(saved, state_size=16)
    with pytest.raises(CheckpointError) as e:
        load_lm(saved)
    msg = str(e.value)
    assert "model.safetensors:backbone.layers.0.mixer.A_log has shape (64, 8)" in msg
    assert "expects (64, 16)" in msg


def test_extra_layers_in_the_weights(saved):
    edit_config(saved, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"no place for: model\.safetensors:backbone\.layers\.1\."):
        load_lm(saved)


def test_missing_key_is_named(saved):
    sd = load_file(saved / "model.safetensors")
    del sd["backbone.layers.1.mixer.dt_proj.bias"]
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"1 weight\(s\) missing: layers\.1\.mixer\.dt_proj\.bias \(64,\)"
    ):
        load_lm(saved)


def test_untied_head_missing(saved):
    sd = load_file(saved / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: lm_head\.weight"):
        load_lm(saved)


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: cannot read the weights.*truncated or corrupt"
    ):
        load_lm(saved)


def test_truncated_pytorch_bin(saved):
    sd = load_file(saved / "model.safetensors")
    (saved / "model.safetensors").unlink()
    torch.save(sd, saved / "pytorch_model.bin")
    data = (saved / "pytorch_model.bin").read_bytes()
    (saved / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read the weights"):
        load_lm(saved)


def test_pickled_code_is_refused(saved):
    (saved / "model.safetensors").unlink()
    torch.save({"weights": [1, 2, 3], "fn": print}, saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        load_lm(saved)


def test_missing_shard(tmp_path):
    path = Path(
        refmodels.save(refmodels.make("mamba2-groups2-untied"), tmp_path / "m", max_shard_size="20KB")
    )
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard\(s\) that are missing: \['{shards[-1].name}'\]"):
        load_lm(path)


def test_unsupported_activation(saved):
    edit_config(saved, hidden_act="gelu")
    with pytest.raises(CheckpointError, match="hidden_act='gelu' is not supported"):
        load_lm(saved)


@torch.no_grad()
def test_bad_inputs(saved):
    lm = load_lm(saved)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        lm()
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        lm(torch.zeros(1, 2, dtype=torch.long), inputs_embeds=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match=r"vocabulary has 101 entries"):
        lm(torch.tensor([[5, 101]]))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        lm(torch.tensor([5, 6]))
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, tokens, 32\]"):
        lm(inputs_embeds=torch.zeros(1, 3, 16))
    with pytest.raises(ValueError, match="state holds 2 sequences but the input has 1"):
        lm(torch.tensor([[1, 2]]), state=lm.new_state(2))


# ---- config fields of the wrong type or range: one CheckpointError naming the file and the field ----------
GOOD_CONFIGS = {
    "mamba": {"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 101},
    "mamba2": {
        "model_type": "mamba2",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_heads": 8,
        "head_dim": 8,
        "n_groups": 2,
        "vocab_size": 101,
    },
    "jamba": {
        "model_type": "jamba",
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 48,
        "num_experts": 4,
        "vocab_size": 101,
    },
    "mamba_ssm": {"d_model": 64, "n_layer": 2, "vocab_size": 257, "ssm_cfg": {"d_state": 8}},
}
BAD_FIELDS = [
    ("mamba", "hidden_size", "32", r"hidden_size must be an integer ≥ 1, got '32'"),
    ("mamba", "state_size", 2.5, r"state_size must be an integer ≥ 1, got 2\.5"),
    ("mamba", "conv_kernel", True, r"conv_kernel must be an integer ≥ 1, got True"),
    ("mamba", "num_hidden_layers", -1, r"num_hidden_layers must be an integer ≥ 1, got -1"),
    ("mamba", "num_hidden_layers", 10**7, r"n_layer must be in \[1, 4096\], got 10000000"),
    ("mamba", "hidden_size", 2**30, r"d_model must be in \[1, 16777216\], got 1073741824"),
    ("mamba", "intermediate_size", -3, r"intermediate_size must be an integer ≥ 0"),
    ("mamba", "time_step_rank", "big", r"time_step_rank must be an integer ≥ 1, got 'big'"),
    ("mamba", "use_bias", "yes", r"use_bias must be true or false, got 'yes'"),
    ("mamba", "tie_word_embeddings", 1, r"tie_word_embeddings must be true or false, got 1"),
    ("mamba", "layer_norm_epsilon", 0, r"layer_norm_epsilon must be a finite number > 0, got 0"),
    ("mamba", "hidden_act", ["silu"], r"hidden_act must be a non-empty string"),
    ("mamba", "model_type", 5, r"model_type must be a string, got 5"),
    ("mamba2", "time_step_limit", "x", r"time_step_limit must be a pair of numbers"),
    ("mamba2", "time_step_limit", [0.0, 1.0, 2.0], r"time_step_limit must be a pair of numbers"),
    ("mamba2", "n_groups", 0, r"n_groups must be an integer ≥ 1, got 0"),
    ("mamba2", "chunk_size", {"size": 8}, r"chunk_size must be an integer ≥ 1"),
    ("jamba", "attn_layer_period", 0, r"attn_layer_period must be an integer ≥ 1, got 0"),
    ("jamba", "expert_layer_offset", -1, r"expert_layer_offset must be an integer ≥ 0"),
    ("jamba", "num_experts_per_tok", 9, r"top_k 9 must be in \[1, n_experts=4\]"),
    ("jamba", "num_experts", 10**6, r"n_experts must be in \[1, 1024\]"),
    ("jamba", "rms_norm_eps", float("inf"), r"rms_norm_eps must be a finite number > 0"),
    ("mamba_ssm", "ssm_cfg", [1], r"ssm_cfg must be an object, got \[1\]"),
    ("mamba_ssm", "ssm_cfg", {"d_state": "8"}, r"ssm_cfg\.d_state must be an integer ≥ 1, got '8'"),
    ("mamba_ssm", "ssm_cfg", {"layer": "Mamba3"}, r"ssm_cfg\.layer='Mamba3' is not supported"),
    ("mamba_ssm", "ssm_cfg", {"layer": "Mamba2", "dt_limit": [1, "x"]}, r"ssm_cfg\.dt_limit must be a pair"),
    ("mamba_ssm", "n_layer", "2", r"n_layer must be an integer ≥ 1, got '2'"),
    ("mamba_ssm", "pad_vocab_size_multiple", 0, r"pad_vocab_size_multiple must be an integer ≥ 1"),
    ("mamba_ssm", "d_intermediate", 128, r"d_intermediate=128 \(an MLP\) is not supported"),
]


@pytest.mark.parametrize("layout", sorted(GOOD_CONFIGS))
def test_the_unbroken_configs_parse(layout):
    from mambavl.lm.layouts import lm_config_from_json

    assert lm_config_from_json(GOOD_CONFIGS[layout], "config.json")[1] == layout


@pytest.mark.parametrize(
    "layout,key,value,says", BAD_FIELDS, ids=[f"{b[0]}-{b[1]}-{b[2]!r}" for b in BAD_FIELDS]
)
def test_wrong_config_field_is_named(tmp_path, layout, key, value, says):
    (tmp_path / "config.json").write_text(json.dumps(GOOD_CONFIGS[layout] | {key: value}))
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'config.json'}: ") + f".*{says}"):
        load_lm(tmp_path)
