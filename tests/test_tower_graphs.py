"""The towers and projector of a few images from CUDA graphs (`vlm.tower_graphs`): on the CPU, the graphs'
very calls run eagerly (`capture=False`) against the plain encoder, padding images included; on a GPU, the
captured graphs against eager encoding."""

import pytest
import torch

import mambavl
from mambavl.vlm.graphs import GraphCaptureError
from mambavl.vlm.tower_graphs import TowerGraphs, batch_of

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pixels(vlm, n: int, seed: int):
    from mambavl.bench.serve import synthetic_image

    return vlm.pixel_values([synthetic_image(64, seed + i) for i in range(n)])


@torch.inference_mode()
@pytest.mark.parametrize("preset", ["tiny-cobra", "tiny-viper-mamba"])
def test_graph_calls_equal_the_plain_encoder_with_padding_images(preset):
    """Batches padded to their bucket with the stale pixels of an earlier, larger call: every real image's
    embeddings equal the plain encoder's."""
    torch.manual_seed(0)
    vlm = mambavl.create(preset)
    graphs = TowerGraphs(vlm._encode, key=(), rows=(1, 2, 4), capture=False)
    graphs(_pixels(vlm, 4, 100))  # leaves four other images in the bucket's buffers
    for n in (3, 1, 2):
        pixels = _pixels(vlm, n, 10 * n)
        assert batch_of(pixels) == n
        torch.testing.assert_close(graphs(pixels), vlm._encode(pixels), rtol=1e-5, atol=1e-5)
    assert graphs.bucket(3) == 4 and graphs.bucket(5) is None and graphs.bucket(0) is None
    with pytest.raises(ValueError, match="no tower graph takes 5 images"):
        graphs(_pixels(vlm, 5, 0))


@torch.inference_mode()
def test_a_failed_tower_capture_encodes_eagerly_from_then_on(monkeypatch):
    vlm = mambavl.create("tiny-cobra")

    class Failing:
        def bucket(self, batch):
            return 1

        def __call__(self, pixels):
            raise GraphCaptureError("capturing the towers for 1 images failed: (simulated)")

    def tower_graphs(self):
        return None if self.__dict__.get("_tower_graphs") is False else Failing()

    monkeypatch.setattr(type(vlm), "tower_graphs", tower_graphs)
    pixels = _pixels(vlm, 1, 0)
    with pytest.warns(RuntimeWarning, match="the vision towers run eagerly"):
        got = vlm.encode_images(pixels)
    torch.testing.assert_close(got, vlm._encode(pixels))
    assert vlm.tower_graphs() is None


def test_no_tower_graphs_on_the_cpu_or_for_towers_of_any_size():
    assert mambavl.create("tiny-cobra").tower_graphs() is None
    assert mambavl.create("tiny-nemotron-omni").tower_graphs() is None


def test_the_connectors_scan_orders_are_made_where_the_features_are():
    """ML-Mamba's connector makes its permutations on the features' device: a copy from the host could
    not be captured in the towers' CUDA graph (they ran eagerly until it was removed)."""
    from mambavl.projectors.msc import scan_orders

    for directions in (2, 4):
        orders = scan_orders(16, directions, torch.device("meta"))
        assert orders[0] is None and all(o.device.type == "meta" for o in orders[1:])
    rev, cols = scan_orders(16, 4)[1:3]
    assert rev.tolist() == list(range(15, -1, -1)) and cols[:4].tolist() == [0, 4, 8, 12]


@cuda
@pytest.mark.usefixtures("exact_fp32")
@pytest.mark.parametrize("preset", ["tiny-cobra", "tiny-viper-mamba", "tiny-mlmamba"])
def test_captured_towers_equal_eager_on_the_gpu(preset):
    vlm = mambavl.create(preset, device="cuda")
    graphs = vlm.tower_graphs()
    assert graphs is not None and vlm.tower_graphs() is graphs
    with torch.inference_mode():
        for n, seed in ((16, 0), (1, 1), (3, 2), (1, 3), (9, 4)):
            pixels = _pixels(vlm, n, 100 * seed)
            want = vlm.encode_images(pixels, graphs=False)
            torch.testing.assert_close(vlm.encode_images(pixels), want, rtol=1e-4, atol=1e-4)
    assert sorted(signature[0] for signature in graphs.graphs) == [1, 4, 16]
