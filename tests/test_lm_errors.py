"""Bad checkpoints and bad inputs get errors that name the file, the key and what was expected;
nothing half-loads."""

import json
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
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
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
