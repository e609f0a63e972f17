"""Image-first splicing, label masking and ragged packing, end to end through an LM."""

import pytest
import torch

from mambavl.lm import LanguageModel, LMConfig
from mambavl.projectors import create_projector
from mambavl.vlm import IGNORE_INDEX, pack, splice_image_first


def test_splice_puts_the_image_first_and_ignores_its_labels():
    text, image = torch.randn(4, 8), torch.randn(3, 8)
    labels = torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 7, 9])  # prompt ignored, answer supervised
    emb, lab = splice_image_first(text, image, labels)
    torch.testing.assert_close(emb, torch.cat([image, text]))
    assert lab.tolist() == [IGNORE_INDEX] * 5 + [7, 9]
    with pytest.raises(ValueError, match="width 5"):
        splice_image_first(text, torch.randn(3, 5))


def test_pack_right_pads_and_marks_images():
    rows = [torch.randn(4, 8), torch.randn(2, 8)]
    images = [torch.randn(3, 8), None]  # a text-only row in the batch
    labels = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6])]
    b = pack(rows, images, labels)
    assert b.embeds.shape == (2, 7, 8) and b.lengths.tolist() == [7, 2]
    assert b.image_positions[0].tolist() == [True] * 3 + [False] * 4 and not b.image_positions[1].any()
    assert b.labels.tolist() == [[IGNORE_INDEX] * 3 + [1, 2, 3, 4], [5, 6] + [IGNORE_INDEX] * 5]
    assert (b.embeds[1, 2:] == 0).all()
    with pytest.raises(ValueError, match="one image"):
        pack(rows, images[:1])
    with pytest.raises(ValueError, match="empty"):
        pack([torch.zeros(0, 8)], [None])


@torch.no_grad()
def test_packed_batch_through_projector_and_lm_equals_rows_alone():
    torch.manual_seed(0)
    lm = LanguageModel(LMConfig(family="mamba", d_model=16, n_layer=2, vocab_size=40, d_state=4)).eval()
    proj = create_projector("fused-gelu-mlp", 12, 16).eval()
    features = [torch.randn(9, 12), None, torch.randn(9, 12)]
    ids = [torch.randint(0, 40, (n,)) for n in (5, 3, 8)]
    text = [lm.embed(i[None])[0] for i in ids]
    images = [None if f is None else proj(f[None])[0] for f in features]
    batch = pack(text, images)
    state = lm.new_state(3)
    out = lm(inputs_embeds=batch.embeds, state=state, lengths=batch.lengths)
    for b, (t, im) in enumerate(zip(text, images, strict=True)):
        row, _ = splice_image_first(t, im)
        want = lm(inputs_embeds=row[None])
        n = row.shape[0]
        torch.testing.assert_close(out[b : b + 1, :n], want, atol=1e-5, rtol=0)
