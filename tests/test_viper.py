"""Viper (LLaVA-NeXT style): chat-template prompts, the image spliced at `<image>`, AnyRes embeddings
with newlines, batched = one by one, and generation on the state equal to re-running the sequence."""

import numpy as np
import pytest
import torch
from PIL import Image

import mambavl
from mambavl.vlm.prompts import CHATML_TEMPLATE, ChatTemplateBuilder


@pytest.fixture(scope="module", params=["tiny-viper-mamba", "tiny-viper-jamba"])
def vlm(request):
    torch.manual_seed(0)
    model = mambavl.create(request.param)
    with torch.no_grad():
        for p in [*model.lm.parameters(), *model.projector.parameters(), model.image_newline]:
            p.add_(torch.randn_like(p) * 0.3)
    return model


def image(seed, size):
    return Image.fromarray(
        np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    )


def prompt(vlm, text):
    pb = vlm.get_prompt_builder()
    pb.add_turn("human", text)
    return pb.get_prompt()


@pytest.mark.parametrize(
    "name,params",
    [
        (
            "viper-mamba-7b",
            7_272_665_088 + 303_507_456 + 1024 * 4096 + 4096 + 4096,
        ),  # LM + CLIP + linear + newline
        ("viper-jamba-52b", 51_570_323_328 + 303_507_456 + 1024 * 4096 + 4096 + 4096),
    ],
)
def test_full_size_presets(name, params):
    assert mambavl.create(name, device="meta").num_parameters() == params


def test_chat_template_builder():
    pb = ChatTemplateBuilder(CHATML_TEMPLATE, "Be brief. ")
    pb.add_turn("human", "<image>\nWhat?")
    first = "<|im_start|>system\nBe brief. <|im_end|>\n<|im_start|>user\n<image>\nWhat?<|im_end|>\n"
    assert pb.get_prompt() == first + "<|im_start|>assistant\n"
    pb.add_turn("gpt", "A dog.")
    potential = pb.get_potential_prompt("Colour?")
    pb.add_turn("human", "Colour?")
    assert (
        pb.get_prompt()
        == potential
        == (
            first
            + "<|im_start|>assistant\nA dog.<|im_end|>\n"
            + "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n"
        )
    )
    with pytest.raises(ValueError, match="must be role 'gpt'"):
        pb.add_turn("human", "again")


@torch.no_grad()
def test_image_is_spliced_at_the_placeholder_with_anyres_tokens(vlm):
    img = image(1, (112, 112))  # a 2×2 grid of 56-px crops, no padding to cut
    p = prompt(vlm, "<image>\nWhat is it?")
    emb = vlm.image_embeddings([img])[0]
    assert emb.shape[0] == 16 + 8 * (8 + 1)  # global 4×4, then 8 rows of 8 features + a newline
    torch.testing.assert_close(emb[16 + 8], vlm.image_newline.to(emb))
    batch, _ = vlm.prepare([img], [p])
    before, after = p.split("<image>")
    nb = len(vlm.tokenizer.encode(before))
    torch.testing.assert_close(batch.embeds[0, nb : nb + emb.shape[0]], emb)
    torch.testing.assert_close(
        batch.embeds[0, :nb], vlm.lm.embed(torch.tensor([vlm.tokenizer.encode(before)]))[0]
    )
    assert int(batch.lengths[0]) == nb + emb.shape[0] + len(vlm.tokenizer.encode(after))


@torch.no_grad()
def test_generation_on_the_state_equals_rerunning_the_sequence(vlm):
    img, p = image(2, (90, 40)), prompt(vlm, "<image>\nDescribe.")
    batch, _ = vlm.prepare([img], [p])
    embeds = batch.embeds[:, : int(batch.lengths[0])]
    out = []
    for _ in range(5):
        full = embeds if not out else torch.cat([embeds, vlm.lm.embed(torch.tensor([out]))], 1)
        logits = vlm.lm(inputs_embeds=full)[0, -1, : vlm.tokenizer.vocab_size]
        logits[vlm.tokenizer.eos_token_id] = float("-inf")
        out.append(int(logits.argmax()))
    assert vlm.generate(img, p, max_new_tokens=5, min_length=5) == vlm.tokenizer.decode(out).strip()


def test_batched_equals_one_by_one(vlm):
    images = [image(3, (120, 50)), None, image(4, (40, 100))]
    prompts = [prompt(vlm, "<image>\nWhat?"), prompt(vlm, "No image here."), prompt(vlm, "<image> Count.")]
    kw = dict(max_new_tokens=5, min_length=3)
    assert vlm.generate(images, prompts, **kw) == [
        vlm.generate(i, p, **kw) for i, p in zip(images, prompts, strict=True)
    ]


def test_placeholder_errors(vlm):
    with pytest.raises(ValueError, match="holds 0 '<image>' markers"):
        vlm.generate(image(5, (60, 60)), prompt(vlm, "no marker"))
    with pytest.raises(ValueError, match="holds 2 '<image>' markers"):
        vlm.generate(image(5, (60, 60)), "<image><image>")
    with pytest.raises(ValueError, match="has '<image>' but no image was given"):
        vlm.generate(None, prompt(vlm, "<image>\nWhat?"))


# --- Viper's LLaVA-style checkpoints -----------------------------------------------------------------------

LLAVA = {
    "llava_falcon_mamba": ("backbone.", "mlp2x_gelu"),
    "llava_jamba": ("model.", "linear"),
}


def write_llava(tmp_path, model_type):
    """A Viper checkpoint as its code saves one: the LM's transformers weights under its prefix, the
    projector and newline beside them, LLaVA's mm_* fields in config.json, the tokenizer files."""
    import json

    from safetensors.torch import save_file

    import refmodels
    from mambavl.vlm.tokenizer import byte_tokenizer

    prefix, projector = LLAVA[model_type]
    tf = refmodels.tf
    if model_type == "llava_falcon_mamba":
        lm = tf.FalconMambaForCausalLM(
            tf.FalconMambaConfig(vocab_size=264, hidden_size=64, state_size=8, num_hidden_layers=2)
        )
    else:
        lm = tf.JambaForCausalLM(
            tf.JambaConfig(
                vocab_size=264,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                attn_layer_period=2,
                attn_layer_offset=1,
                num_experts=4,
                num_experts_per_tok=2,
                mamba_d_state=8,
            )
        )
    refmodels.perturb(lm)
    directory = tmp_path / model_type
    lm.save_pretrained(directory)
    from safetensors.torch import load_file

    sd = {}
    for f in directory.glob("*.safetensors"):
        sd.update(load_file(f))
        f.unlink()
    torch.manual_seed(3)
    if projector == "linear":
        mm = {"mm_projector.weight": torch.randn(64, 32), "mm_projector.bias": torch.randn(64)}
    else:
        mm = {
            f"mm_projector.{i}.{n}": torch.randn(64, 32 if i == 0 and n == "weight" else 64)
            if n == "weight"
            else torch.randn(64)
            for i in (0, 2)
            for n in ("weight", "bias")
        }
    mm["image_newline"] = torch.randn(64)
    sd |= {prefix + k: v for k, v in mm.items()}
    sd[prefix + "vision_tower.vision_tower.unused.weight"] = torch.zeros(2)  # saved, never used
    save_file(sd, directory / "model.safetensors")
    cfg = json.loads((directory / "config.json").read_text())
    cfg |= {
        "model_type": model_type,
        "mm_vision_tower": "tiny-clip",
        "mm_vision_select_layer": -2,
        "mm_projector_type": projector,
        "mm_hidden_size": 32,
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": [[56, 56], [112, 56], [56, 112], [112, 112]],
        "mm_patch_merge_type": "spatial_unpad",
    }
    (directory / "config.json").write_text(json.dumps(cfg))
    byte_tokenizer().tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML_TEMPLATE, "eos_token": "<|endoftext|>"})
    )
    return directory, lm, mm


@torch.no_grad()
@pytest.mark.parametrize("model_type", sorted(LLAVA))
def test_viper_checkpoint_loads_and_converts(tmp_path, model_type):
    from mambavl.checkpoints.vlm import convert, load

    directory, ref, mm = write_llava(tmp_path, model_type)
    vlm = load(directory)
    ids = torch.randint(0, 257, (2, 19))
    assert (vlm.lm(ids) - ref(ids).logits).abs().max() <= 1e-4  # the LM equals transformers'
    torch.testing.assert_close(vlm.image_newline.data, mm["image_newline"])
    proj = {k.replace("mm_projector", "projector"): v for k, v in mm.items() if k.startswith("mm_projector")}
    for k, v in proj.items():
        torch.testing.assert_close(vlm.projector.state_dict()[k], v)
    assert vlm.config.anyres == ((56, 56), (112, 56), (56, 112), (112, 112)) and vlm.config.image_newline
    p = prompt(vlm, "<image>\nWhat is it?")
    assert p.startswith("<|im_start|>system\nYou are a helpful language and vision assistant. <|im_end|>")
    img = image(7, (100, 60))
    want = vlm.generate(img, p, max_new_tokens=5, min_length=5)
    assert (
        load(convert(directory, tmp_path / "ours")).generate(img, p, max_new_tokens=5, min_length=5) == want
    )
