"""The assembled VLM: presets, generation on the recurrent state against a naive re-run of the whole
sequence, batched = one by one, streaming, sampling controls, and bad inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

import mambavl
from mambavl.vision import ImageError
from mambavl.vlm.sampling import SamplingParams, next_tokens


@pytest.fixture(scope="module", params=["tiny-cobra", "tiny-mlmamba"])
def vlm(request):
    torch.manual_seed(0)
    model = mambavl.create(request.param)
    with torch.no_grad():  # random weights, spread out so that greedy outputs are not all alike
        for p in model.lm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def image(seed, size=(64, 48)):
    return Image.fromarray(
        np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    )


def prompt(vlm, text):
    pb = vlm.get_prompt_builder()
    pb.add_turn("human", text)
    return pb.get_prompt()


@pytest.mark.parametrize("name,params", [("cobra+3b", 3_548_076_096), ("mlmamba+3b", 3.619e9)])
def test_full_size_presets(name, params):
    n = mambavl.create(name, device="meta").num_parameters()
    assert abs(n - params) / params < 1e-3, n


def test_prompt_builder_is_zephyr(vlm):
    assert prompt(vlm, "<image>\nHi") == "<|user|>\nHi<|endoftext|>\n<|assistant|>\n"


@torch.no_grad()
def naive_greedy(vlm, img, text, n):
    """No state: the whole sequence [image | prompt | generated] re-run for every new token."""
    ids = vlm.tokenizer.encode(text)
    prefix = [] if img is None else [vlm.encode_images(vlm.pixel_values([img]))[0]]
    out = []
    for _ in range(n):
        embeds = torch.cat([*prefix, vlm.lm.embed(torch.tensor([ids + out]))[0]])[None]
        logits = vlm.lm(inputs_embeds=embeds)[0, -1, : vlm.tokenizer.vocab_size]
        logits[vlm.tokenizer.eos_token_id] = float("-inf")  # min_length = n below
        out.append(int(logits.argmax()))
    return vlm.tokenizer.decode(out).strip()


def test_generate_on_the_state_equals_rerunning_the_sequence(vlm):
    for img, text in [(image(1), "What is this?"), (None, "Text only, no image.")]:
        got = vlm.generate(img, prompt(vlm, text), max_new_tokens=6, min_length=6)
        assert got == naive_greedy(vlm, img, prompt(vlm, text), 6)


def test_batched_generation_equals_one_by_one(vlm):
    images = [image(2), None, image(3, (30, 90)), image(4)]
    prompts = [prompt(vlm, t) for t in ("Describe.", "Just text, a longer prompt here.", "Colour?", "Hm")]
    kw = dict(max_new_tokens=7, min_length=3)
    batched = vlm.generate(images, prompts, **kw)
    assert batched == [vlm.generate(i, p, **kw) for i, p in zip(images, prompts, strict=True)]


def test_stream_yields_the_generated_text(vlm):
    p = prompt(vlm, "Go on.")
    pieces = list(vlm.stream(image(5), p, max_new_tokens=6, min_length=6))
    assert "".join(pieces).strip() == vlm.generate(image(5), p, max_new_tokens=6, min_length=6)


def test_sampling_is_seeded(vlm):
    p = prompt(vlm, "Tell me.")
    kw = dict(max_new_tokens=8, min_length=8, do_sample=True, temperature=1.5, seed=7)
    assert vlm.generate(image(6), p, **kw) == vlm.generate(image(6), p, **kw)
    others = {vlm.generate(image(6), p, **(kw | {"seed": s})) for s in range(5)}
    assert len(others) > 1


def test_stop_strings_cut_the_text(vlm):
    p = prompt(vlm, "Say something long.")
    full = vlm.generate(None, p, max_new_tokens=10, min_length=10)
    stop = next(c for c in full[3:] if not c.isspace())  # a character from the middle of the answer
    cut = vlm.generate(None, p, max_new_tokens=10, min_length=10, stop=[stop])
    assert cut == full[: full.find(stop)].strip()


def test_seed_flags_are_accepted(vlm):
    p = prompt(vlm, "x")
    assert vlm.generate(None, p, max_new_tokens=3, use_cache=True, cg=True) == vlm.generate(
        None, p, max_new_tokens=3
    )


def test_bad_inputs(vlm):
    with pytest.raises(ValueError, match="temperature=0 is invalid"):
        vlm.generate(None, "x", do_sample=True, temperature=0)
    with pytest.raises(ValueError, match=r"top_p=1.5 is invalid: it must be in \(0, 1\]"):
        vlm.generate(None, "x", top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        vlm.generate(None, "x", max_new_tokens=0)
    with pytest.raises(TypeError, match="generate takes"):
        vlm.generate(None, "x", beams=4)
    with pytest.raises(ValueError, match="empty and has no image"):
        vlm.generate(None, "")
    with pytest.raises(ValueError, match="takes at most 2048"):
        vlm.generate(image(0), "word " * 2500)
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        vlm.generate([None, None], ["x"])
    with pytest.raises(ImageError, match="not an image file"):
        vlm.generate(b"not an image", "x")
    assert isinstance(vlm.generate(image(0), ""), str)  # an image alone is a valid start


def test_sampling_controls():
    logits = torch.tensor([[1.0, 3.0, 2.0, 9.0]])  # id 3 is a padded vocabulary row
    p = SamplingParams()
    assert next_tokens(logits, p, [[]], 0, eos_id=0, vocab_size=3).item() == 1  # padding never chosen
    assert next_tokens(logits, SamplingParams(repetition_penalty=3.0), [[1]], 0, 0, 3).item() == 2
    assert (
        next_tokens(torch.tensor([[5.0, 1.0, 0.0]]), SamplingParams(min_length=2), [[]], 1, 0, 3).item() == 1
    )
    g = torch.Generator().manual_seed(0)
    for params in (SamplingParams(do_sample=True, top_k=1), SamplingParams(do_sample=True, top_p=0.01)):
        assert next_tokens(logits, params, [[]], 0, 0, 3, g).item() == 1
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        SamplingParams(stop=("",))


@pytest.mark.parametrize(
    ("penalty", "want"),
    [
        (dict(frequency_penalty=0.3), 1),  # 5 - 2 × 0.3 = 4.4 < 4.5
        (dict(frequency_penalty=0.2), 0),  # 5 - 2 × 0.2 = 4.6 > 4.5
        (dict(presence_penalty=0.6), 1),  # once, however often: 4.4
        (dict(presence_penalty=0.4), 0),
        (dict(repetition_penalty=1.2), 1),  # 5 / 1.2 < 4.5
        (dict(repetition_penalty=1.05), 0),  # 5 / 1.05 > 4.5
    ],
)
def test_penalties_take_their_exact_sizes(penalty, want):
    """OpenAI's presence and frequency penalties and the seeds' repetition penalty, exactly, on the ids
    seen (twice id 0; ids beyond the vocabulary, or negative, are ignored), row by row in a batch."""
    logits = torch.tensor([[5.0, 4.5, 0.0, 9.0], [5.0, 4.5, 0.0, 9.0]])
    seen = [[0, 0, 7, -1], []]
    got = next_tokens(logits, SamplingParams(**penalty), seen, 0, eos_id=2, vocab_size=3, generated=seen)
    assert got.tolist() == [want, 0]


def test_unknown_preset():
    with pytest.raises(KeyError, match="unknown preset 'cobra'"):
        mambavl.create("cobra")


@pytest.mark.parametrize("name", sorted(mambavl.PRESETS))
def test_every_preset_builds_and_tiny_ones_run(name):
    meta = mambavl.create(name, device="meta")
    assert meta.projector(
        torch.empty(1, meta.vision.num_patches, meta.vision.embed_dim, device="meta")
    ).shape[-1] == (meta.config.lm.d_model)
    if not name.startswith("tiny-"):
        return
    vlm = mambavl.create(name)
    text = "<image>\nWhat?" if vlm.config.image_placement == "placeholder" else "What?"
    p = prompt(vlm, text)
    batch, _ = vlm.prepare([image(9), None], [p, prompt(vlm, "text only")])
    logits = vlm.lm(inputs_embeds=batch.embeds, lengths=batch.lengths)
    assert logits.shape[:2] == batch.embeds.shape[:2] and torch.isfinite(logits).all()
    assert isinstance(vlm.generate(image(9), p, max_new_tokens=2), str)


def test_save_and_from_pretrained_methods(tmp_path):
    vlm = mambavl.create("tiny-cobra")
    vlm.save_pretrained(tmp_path / "m")
    again = mambavl.VLM.from_pretrained(tmp_path / "m")
    for k, v in vlm.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, atol=0, rtol=0)


@pytest.mark.parametrize("preset", ["tiny-cobra", "tiny-mlmamba", "tiny-viper-jamba"])
def test_chunked_prefill_equals_whole_prefill(preset):
    """Prefilling a ragged batch a few positions at a time gives the same answers as all at once."""
    torch.manual_seed(0)
    vlm = mambavl.create(preset)
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), None, Image.new("RGB", (30, 50), (10, 90, 200))]
    prompts = []
    for text in ("What is in the image? " * 3, "A much longer question about nothing at all. " * 4, "Hi"):
        pb = vlm.get_prompt_builder()
        pb.add_turn("human", ("<image>\n" if vlm.config.image_placement == "placeholder" else "") + text)
        prompts.append(pb.get_prompt())
    prompts[1] = prompts[1].replace("<image>\n", "")
    vlm.prefill_chunk = None
    whole = vlm.generate(images, prompts, max_new_tokens=12, do_sample=False)
    batch, _ = vlm.prepare(images, prompts)
    state_whole = vlm.lm.new_state(3)
    h_whole = vlm.prefill(batch.embeds, batch.lengths, state_whole)
    vlm.prefill_chunk = 7
    chunked = vlm.generate(images, prompts, max_new_tokens=12, do_sample=False)
    state_chunked = vlm.lm.new_state(3)
    h_chunked = vlm.prefill(batch.embeds, batch.lengths, state_chunked)
    assert chunked == whole
    torch.testing.assert_close(h_chunked, h_whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["tiny-cobra", "tiny-mlmamba", "tiny-viper-jamba"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_prefill_with_lengths_on_the_host_equals_a_tensor_of_them(preset, chunk):
    """Lengths given as a host list (the engine's way: the host never waits for the device) give the same
    hidden states and states as a tensor of them, ragged rows, a row of nothing and chunks included."""
    torch.manual_seed(0)
    vlm = mambavl.create(preset)
    vlm.prefill_chunk = chunk
    embeds = torch.randn(4, 23, vlm.config.lm.d_model)
    lengths = [23, 5, 0, 16]
    got_state, want_state = vlm.lm.new_state(4), vlm.lm.new_state(4)
    got = vlm.prefill(embeds, lengths, got_state)
    want = vlm.prefill(embeds, torch.tensor(lengths), want_state)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for mine, theirs in zip(got_state.layers, want_state.layers, strict=True):
        for name, t in mine.items():
            torch.testing.assert_close(t, theirs[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"lengths must be \[4\] integers in \[0, 23\]"):
        vlm.prefill(embeds, [23, 5, 0, 24], vlm.lm.new_state(4))


def test_embedding_a_host_list_equals_a_tensor_and_is_checked():
    from mambavl.runtime import to_device

    vlm = mambavl.create("tiny-cobra")
    ids = [3, 0, vlm.config.lm.vocab_size - 1, 7]
    assert to_device(ids, vlm.device).tolist() == ids and to_device(ids, vlm.device).dtype == torch.long
    torch.testing.assert_close(vlm.lm.embed(ids), vlm.lm.embed(torch.tensor(ids)), rtol=0, atol=0)
    assert vlm.lm.embed([]).shape == (0, vlm.config.lm.d_model)
    with pytest.raises(ValueError, match="use this model's tokenizer"):
        vlm.lm.embed([1, vlm.config.lm.vocab_size])
