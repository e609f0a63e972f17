"""Checkpoints in the seeds' original layouts (written here, as their code writes them) load to the same
model; ours round-trips; conversion keeps greedy outputs identical."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mambavl
from mambavl.checkpoints import CheckpointError
from mambavl.checkpoints.vlm import convert, load, save_pretrained
from mambavl.cli import app


def perturbed(preset):
    torch.manual_seed(1)
    vlm = mambavl.create(preset)
    with torch.no_grad():
        for p in [*vlm.lm.parameters(), *vlm.projector.parameters()]:
            p.add_(torch.randn_like(p) * 0.3)
    return vlm


def mamba_ssm_keys(lm) -> dict:
    """Our LM keys -> mamba_ssm's `MambaLMHeadModel` keys (tied head included, as it saves it)."""
    out = {}
    for k, v in lm.state_dict().items():
        out[k if k.startswith("lm_head") else f"backbone.{k}"] = v
    return out


def run_config(model_id, llm_id):
    return {
        "model": {
            "model_id": model_id,
            "arch_specifier": "no-align+fused-gelu-mlp",
            "vision_backbone_id": "tiny-dinosiglip",
            "llm_backbone_id": llm_id,
            "image_resize_strategy": "resize-naive",
            "llm_max_length": 2048,
        }
    }


def write_cobra(vlm, directory: Path) -> Path:
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(run_config("tiny-cobra", "tiny-mamba")))
    llm = {f"llm.{k}": v for k, v in mamba_ssm_keys(vlm.lm).items()}  # FSDP keeps the wrapper's `llm.`
    torch.save(
        {"model": {"projector": vlm.projector.state_dict(), "llm_backbone": llm}},
        directory / "checkpoints" / "latest-checkpoint.pt",
    )
    return directory


def write_mlmamba(vlm, directory: Path) -> Path:
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(run_config("tiny-mlmamba", "tiny-mamba2")))
    msc = vlm.projector
    groups = {
        "llm_backbone": mamba_ssm_keys(vlm.lm),  # stripped of `llm_backbone.llm.` by ML-Mamba's saver
        "mlp": msc.mlp.state_dict(),
        "bidirectional_mamba": msc.bidirectional_mamba.state_dict(),
        "projector": msc.projector.state_dict(),
    }
    torch.save({"model": groups}, directory / "checkpoints" / "latest-checkpoint.pt")
    return directory


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))


def outputs(vlm):
    pb = vlm.get_prompt_builder()
    pb.add_turn("human", "What is it?")
    return vlm.generate([IMAGE, None], [pb.get_prompt(), "In: hi\nOut: "], max_new_tokens=6, min_length=6)


@pytest.mark.parametrize("preset,write", [("tiny-cobra", write_cobra), ("tiny-mlmamba", write_mlmamba)])
def test_original_layout_loads_and_converts(tmp_path, preset, write):
    vlm = perturbed(preset)
    want = outputs(vlm)
    original = load(write(vlm, tmp_path / "run"))
    assert original.config.projector == vlm.config.projector
    for k, v in vlm.state_dict().items():
        torch.testing.assert_close(original.state_dict()[k], v, atol=0, rtol=0, msg=k)
    assert outputs(original) == want

    converted = convert(tmp_path / "run", tmp_path / "ours")
    assert sorted(p.name for p in converted.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert outputs(load(converted)) == want


def test_our_layout_round_trips(tmp_path):
    vlm = perturbed("tiny-mlmamba")
    save_pretrained(vlm, tmp_path / "m")
    again = load(tmp_path / "m")
    assert again.config.tokenizer == "tokenizer.json"  # saved beside the weights, so it works offline
    assert dataclasses.replace(again.config, tokenizer=vlm.config.tokenizer) == vlm.config
    assert outputs(again) == outputs(vlm)
    assert again.lm.lm_head.weight is again.lm.embedding.weight  # the tie survives
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_convert_command(tmp_path):
    write_cobra(perturbed("tiny-cobra"), tmp_path / "run")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "run"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="neither a model directory nor a preset"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoints/latest-checkpoint\.pt"):
        load(tmp_path / "empty")
    run = write_cobra(perturbed("tiny-cobra"), tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["llm_backbone_id"] = "mamba-1.4b"
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unknown llm_backbone_id 'mamba-1\.4b'"):
        load(run)
    cfg["model"]["llm_backbone_id"] = "tiny-mamba2"  # the weights are Mamba-1's
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"latest-checkpoint\.pt: llm_backbone"):
        load(run)


def test_top_level_api_as_the_seeds_call_it(tmp_path):
    assert mambavl.available_models() == ["cobra+3b", "mlmamba+3b"]
    write_cobra(perturbed("tiny-cobra"), tmp_path / "run")
    vlm = mambavl.load(str(tmp_path / "run"))
    assert isinstance(vlm, mambavl.VLM)


def test_align_stage_checkpoint_is_explained(tmp_path):
    run = write_cobra(perturbed("tiny-cobra"), tmp_path / "run")
    ckpt = run / "checkpoints" / "latest-checkpoint.pt"
    groups = torch.load(ckpt, weights_only=True)["model"]
    torch.save({"model": {"projector": groups["projector"]}}, ckpt)
    with pytest.raises(CheckpointError, match="an align-stage checkpoint"):
        load(run)


def test_a_chat_template_model_round_trips_in_our_layout(tmp_path):
    """Viper-style fields (AnyRes pinpoints, chat template, placeholder, newline) come back as they were:
    pinpoints as tuples, not JSON's lists, so the configs compare equal."""
    torch.manual_seed(0)
    vlm = mambavl.create("tiny-viper-mamba")
    save_pretrained(vlm, tmp_path / "m")
    again = load(tmp_path / "m")
    assert dataclasses.replace(again.config, tokenizer=vlm.config.tokenizer) == vlm.config
    assert again.config.anyres == vlm.config.anyres and isinstance(again.config.anyres[0], tuple)
    ids = torch.randint(0, 257, (1, 9))
    torch.testing.assert_close(again.lm(ids), vlm.lm(ids), rtol=0, atol=0)


def test_config_errors_name_the_file_and_every_field(tmp_path):
    save_pretrained(perturbed("tiny-cobra"), tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw["config"] |= {"max_length": -5, "tower": "vit-huge", "extra_field": 1}
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as e:
        load(tmp_path / "m")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'm' / 'config.json'}: invalid model config:")
    assert "config.extra_field: not a field mambavl knows" in msg  # types and names first: one pass each
    raw["config"].pop("extra_field")
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as e:
        load(tmp_path / "m")
    assert "config.tower: 'vit-huge' is not one of" in str(e.value)
    assert "config.max_length: must be ≥ 1, got -5" in str(e.value)
