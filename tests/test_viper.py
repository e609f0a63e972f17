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
