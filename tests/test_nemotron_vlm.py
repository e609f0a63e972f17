"""NVIDIA's Nemotron Omni VLM against transformers' nemotron_h_omni: the image processor's patch grid and
pixels, and a whole checkpoint (C-RADIO tower, pixel shuffle, projector, Nemotron-H LM with MoE) from
image and prompt to logits; our tiny preset end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import mambavl
import refmodels
from mambavl.vision.radio import DynamicTransform, patch_grid
from mambavl.vlm.prompts import CHATML_TEMPLATE

tf = refmodels.tf
omni = pytest.importorskip("transformers.models.nemotron_h_omni.image_processing_nemotron_h_omni")


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 3000),
    width=st.integers(1, 3000),
    patch=st.sampled_from([8, 14, 16]),
    merge=st.sampled_from([1, 2, 3]),
    budget=st.sampled_from([(1024, 13312), (16, 64), (4, 4096), (256, 0), (64, 64)]),
)
def test_patch_grid_is_the_processors(height, width, patch, merge, budget):
    lo, hi = budget
    if hi and hi < merge * merge:
        return
    ours = patch_grid(height, width, patch, merge, lo, hi)
    assert min(ours) >= 1
    try:
        want = omni.get_patch_grid_size(height, width, patch, merge, lo, hi)
    except ZeroDivisionError:  # a sliver of an image: the processor fails, ours keeps a patch a side
        return
    if min(want) >= 1:  # else the processor's grid is empty
        assert ours == want


@pytest.mark.parametrize("size", [(100, 60), (37, 211), (64, 64), (640, 480)])
def test_dynamic_transform_is_the_processors(size):
    """The pixels the tower sees equal the released processor's, patch for patch."""
    processor = omni.NemotronH_Omni_Reasoning_V3ImageProcessor(
        patch_size=8, min_num_patches=16, max_num_patches=64
    )
    img = picture(sum(size), size)
    theirs = processor(images=[img], return_tensors="pt")
    ours = DynamicTransform(8, 2, 16, 64, omni.OPENAI_CLIP_MEAN, omni.OPENAI_CLIP_STD)(img)
    rows, cols = theirs["image_grid_hw"][0].tolist()
    assert tuple(ours.shape) == (3, rows * 8, cols * 8)
    patches = ours.reshape(3, rows, 8, cols, 8).permute(1, 3, 0, 2, 4).reshape(rows * cols, -1)
    torch.testing.assert_close(patches, theirs["pixel_values"], atol=1e-5, rtol=0)


IMAGE_ID = 299


def write_nemotron(tmp_path, mtp: bool = False):
    """A Nemotron Omni checkpoint as transformers saves one (the released key layout), with tokenizer
    files: a byte tokenizer whose <img>, </img> and <image> are single ids, as in the real one."""
    from mambavl.vlm.tokenizer import byte_tokenizer

    text = dict(
        model_type="nemotron_h", hybrid_override_pattern="M*EM-", vocab_size=300, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=24, moe_shared_expert_intermediate_size=40,
        num_nextn_predict_layers=1 if mtp else 0,
        **{k: v for k, v in refmodels.NEMOTRON_H_SIZES.items() if k != "vocab_size"},
    )  # fmt: skip
    vision = dict(
        model_type="radio", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
        max_img_size=96, num_cls_tokens=2, num_registers=3, video_temporal_patch_size=2,
    )  # fmt: skip
    config = tf.NemotronH_Omni_Reasoning_V3_Config(
        text_config=text, vision_config=vision, projector_hidden_size=48, vision_hidden_size=32,
        image_token_id=IMAGE_ID,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = refmodels.perturb(tf.NemotronH_Omni_Reasoning_V3(config).float())
    for name, p in ref.named_parameters():
        if "layer_scale" in name:  # C-RADIO has no LayerScale: transformers keeps an identity one
            p.data.fill_(1.0)
    directory = tmp_path / "nemotron"
    ref.save_pretrained(directory)
    tok = byte_tokenizer().tokenizer
    tok.add_special_tokens(["<img>", "</img>", "<image>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>"})
    )
    (directory / "preprocessor_config.json").write_text(
        json.dumps({"patch_size": 8, "min_num_patches": 16, "max_num_patches": 64, "downsample_ratio": 0.5})
    )
    return directory, ref


@torch.no_grad()
@pytest.mark.parametrize("mtp", [False, True], ids=["plain", "final-norm"])
def test_checkpoint_equals_transformers_from_image_to_logits(tmp_path, mtp):
    directory, ref = write_nemotron(tmp_path, mtp)
    vlm = mambavl.load(directory)
    assert vlm.config.tower_options.get("final_norm", False) is mtp
    builder = vlm.get_prompt_builder()
    builder.add_turn("human", "<image>\nWhat is in the picture?")
    prompt = builder.get_prompt()
    images = [picture(1, (100, 60)), picture(2, (40, 90))]
    batch, _ = vlm.prepare(images, [prompt, prompt])
    ours = vlm.lm(inputs_embeds=batch.embeds, lengths=batch.lengths)

    processor = omni.NemotronH_Omni_Reasoning_V3ImageProcessor(
        patch_size=8, min_num_patches=16, max_num_patches=64
    )
    image_id = vlm.tokenizer.encode("<image>")
    assert len(image_id) == 1
    before, after = prompt.split("<image>")
    for row, img in enumerate(images):
        pixels = processor(images=[img], return_tensors="pt")
        n = int(pixels["image_grid_hw"].prod()) // 4
        input_ids = (
            vlm.tokenizer.encode(before + "<img>") + [IMAGE_ID] * n + vlm.tokenizer.encode("</img>" + after)
        )
        assert len(input_ids) == int(batch.lengths[row])
        theirs = ref(
            input_ids=torch.tensor([input_ids]),
            pixel_values=pixels["pixel_values"],
            image_grid_hw=pixels["image_grid_hw"],
        ).logits[0]
        assert (ours[row, : len(input_ids)] - theirs).abs().max() <= 1e-4


@torch.no_grad()
def test_checkpoint_generates_and_converts(tmp_path):
    from mambavl.checkpoints.vlm import convert, load, read_config

    directory, _ = write_nemotron(tmp_path)
    vlm = load(directory)
    config, layout = read_config(directory)
    assert config == vlm.config and layout.startswith("Nemotron Omni")
    builder = vlm.get_prompt_builder()
    builder.add_turn("human", "<image>\nDescribe it.")
    prompt = builder.get_prompt()
    img = picture(5, (70, 50))
    want = vlm.generate(img, prompt, max_new_tokens=6, min_length=6)
    again = load(convert(directory, tmp_path / "ours"))
    # our layout keeps its own tokenizer.json
    assert dataclasses.replace(again.config, tokenizer=vlm.config.tokenizer) == vlm.config
    assert again.generate(img, prompt, max_new_tokens=6, min_length=6) == want
    # a batch of images of different sizes equals one by one
    images = [picture(5, (70, 50)), picture(6, (30, 120)), None]
    prompts = [prompt, prompt, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    batched = vlm.generate(images, prompts, max_new_tokens=5, min_length=5)
    one_by_one = [
        vlm.generate(i, p, max_new_tokens=5, min_length=5) for i, p in zip(images, prompts, strict=True)
    ]
    assert batched == one_by_one


def test_hostile_nemotron_configs_are_refused(tmp_path):
    from mambavl.checkpoints.files import CheckpointError

    directory, _ = write_nemotron(tmp_path)
    raw = json.loads((directory / "config.json").read_text())
    for change, message in [
        ({"downsample_ratio": 0.3}, "downsample_ratio"),
        ({"vision_config": raw["vision_config"] | {"use_swiglu_ffn": True}}, "use_swiglu_ffn"),
        ({"vision_hidden_size": 64}, "vision_hidden_size"),
        ({"text_config": "nope"}, "text_config"),
    ]:
        (directory / "config.json").write_text(json.dumps(raw | change))
        with pytest.raises(CheckpointError, match=message):
            mambavl.load(directory)
    (directory / "config.json").write_text(json.dumps(raw))
    from safetensors.torch import load_file, save_file

    sd = load_file(directory / "model.safetensors")
    key = "vision_model.radio_model.model.blocks.0.layer_scale1.lambda1"
    save_file(sd | {key: sd[key] * 2}, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="LayerScale"):
        mambavl.load(directory)


def test_tiny_preset_images_of_any_size():
    """Each image at its own size: positions follow its grid, and a batch of sizes equals one by one."""
    vlm = mambavl.create("tiny-nemotron-omni")
    builder = vlm.get_prompt_builder()
    builder.add_turn("human", "<image>\nWhat?")
    prompt = builder.get_prompt()
    images = [picture(1, (90, 40)), picture(2, (40, 70)), picture(3, (300, 300))]
    batch, _ = vlm.prepare(images, [prompt] * 3)
    text = len(vlm.encode_prompt(prompt, True).ids)
    for row, img in enumerate(images):
        positions = vlm.image_positions(vlm.preprocess(img))
        rows, cols = vlm.vision.transform().grid(*img.size)
        assert positions == rows * cols // 4
        assert int(batch.lengths[row]) == text + positions
    one = [vlm.image_embeddings([img])[0] for img in images]
    for a, b in zip(vlm.image_embeddings(images), one, strict=True):
        torch.testing.assert_close(a, b)


def test_released_model_name_is_read_from_its_hub_files(monkeypatch, tmp_path):
    """`load("nemotron-3-nano-omni")` reads the released repo's own files (here a local stand-in for the
    hub snapshot): the config comes from its config.json, not from a copy of ours."""
    from mambavl.checkpoints import vlm as checkpoints
    from mambavl.presets import HUB_MODELS

    directory, _ = write_nemotron(tmp_path)
    asked = []

    def snapshot(repo_id):
        asked.append(repo_id)
        return directory

    monkeypatch.setattr(checkpoints, "resolve_model_dir", snapshot)
    vlm = mambavl.load("nemotron-3-nano-omni")
    assert asked == [HUB_MODELS["nemotron-3-nano-omni"][0]] and vlm.config.tower == "c-radio-h"


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 2000), height=st.integers(1, 2000))
def test_any_image_shape_reads(width, height):
    """Slivers, squares and panoramas alike become a grid of whole 2×2 blocks, and the tower reads them
    (the released processor divides by zero on the thinnest; its rounding to whole blocks may pass the
    budget by a row or column of a sliver, which ours keeps: the model was trained on its grids)."""
    from mambavl.vision import create_tower

    tower = create_tower("tiny-radio")
    transform = tower.transform()
    rows, cols = transform.grid(width, height)
    assert rows % 2 == 0 and cols % 2 == 0 and 4 <= rows * cols <= 64 + 2 * max(rows, cols)
    pixels = transform(Image.new("RGB", (width, height), (90, 160, 30)))
    assert tuple(pixels.shape) == (3, rows * 8, cols * 8) and torch.isfinite(pixels).all()
    with torch.no_grad():
        assert tower(pixels[None]).shape == (1, rows * cols // 4, tower.embed_dim)
