"""CUDA-graph decoding and the Triton prefill on a GPU: the same tokens as eager decoding, padding slots
that never touch a live sequence, and whole-model equality of the Triton and PyTorch backends.
Run where a GPU is (skipped elsewhere)."""

import pytest
import torch

import mambavl
from mambavl.engine.scheduler import Engine, EngineConfig
from mambavl.vlm.graphs import BUCKETS, GraphDecoder, KVGraphDecoder, bucket_for, graph_support

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("exact_fp32"),
]


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 64, 65, 256, 300)] == [1, 2, 4, 8, 64, 96, 256, 300]
    assert list(BUCKETS) == sorted(BUCKETS)


@pytest.mark.parametrize("preset", ["tiny-cobra", "tiny-mlmamba"])
def test_graph_decoding_equals_eager_for_256_greedy_steps(preset):
    vlm = mambavl.create(preset, device="cuda")
    assert graph_support(vlm.lm) is None
    prompts = ["What is in the picture?", "Count the shapes.", "Hi"]
    kw = dict(max_new_tokens=256, min_length=256)
    images = [None, None, None]
    eager = vlm.generate(images, prompts, cuda_graphs=False, **kw)
    graphed = vlm.generate(images, prompts, **kw)
    assert graphed == eager
    assert vlm.generate(None, prompts[0], cg=False, **kw) == eager[0]  # the seeds' flag


def test_padding_slots_never_touch_live_rows():
    vlm = mambavl.create("tiny-cobra", device="cuda")
    lm = vlm.lm
    decoder = GraphDecoder(lm, 8)
    decoder.prepare(3)  # bucket 4: slot 3 is padding, slots 4..7 are outside the graph
    sentinel = decoder.state.map(lambda t: torch.full_like(t[4:], 7.0))
    decoder.load(sentinel, slots=[4, 5, 6, 7])
    eager = lm.new_state(3)
    ids = torch.randint(0, lm.config.vocab_size, (3, 12), device="cuda")
    lm(ids, state=eager)
    decoder.load(eager)
    decoder.load(lm.new_state(1).map(lambda t: torch.full_like(t, 1e30)), slots=[3])  # garbage padding
    tok = ids[:, -1]
    for _ in range(20):
        want = lm(tok[:, None], state=eager)[:, -1]
        got = decoder.step(tok)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        tok = want.argmax(-1)
    for mine, theirs in zip(decoder.read([4, 5, 6, 7]).layers, sentinel.layers, strict=True):
        for name in mine:
            assert torch.equal(mine[name], theirs[name])


def test_experts_past_the_static_size_decode_eagerly():
    vlm = mambavl.create("tiny-viper-jamba", device="cuda")
    assert graph_support(vlm.lm, 256) is None
    assert "mixture-of-experts" in graph_support(vlm.lm, 257)
    assert vlm.graph_decoder(300) is None
    assert isinstance(vlm.generate(None, "Hello", max_new_tokens=4), str)


@pytest.mark.parametrize(
    "preset", ["tiny-cobra-nemotron-h", "tiny-cobra-falcon-h1", "tiny-cobra-zamba2", "tiny-viper-jamba"]
)
def test_hybrid_graph_decoding_equals_eager(preset):
    """Attention layers (and Jamba's experts) in CUDA graphs: 300 greedy steps cross the 64-, 128- and
    256-position graphs and one growth of the buffers, rows of different lengths side by side."""
    vlm = mambavl.create(preset, device="cuda")
    assert isinstance(vlm.graph_decoder(3), KVGraphDecoder)
    prompts = ["What is in the picture?", "Count the shapes. " * 9, "Hi"]
    kw = dict(max_new_tokens=300, min_length=300)
    eager = vlm.generate([None] * 3, prompts, cuda_graphs=False, **kw)
    assert vlm.generate([None] * 3, prompts, **kw) == eager


@pytest.mark.parametrize("preset", ["tiny-cobra", "tiny-mlmamba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_prefill_equals_torch(monkeypatch, preset, dtype):
    vlm = mambavl.create(preset, device="cuda", dtype=dtype)
    ids = torch.randint(0, vlm.config.lm.vocab_size, (2, 300), device="cuda")
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MAMBAVL_BACKEND", backend)
        state = vlm.lm.new_state(2)
        with torch.inference_mode():
            out[backend] = (vlm.lm(ids, state=state).float(), state)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.1)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], **tol)
    for a, b in zip(out["triton"][1].layers, out["torch"][1].layers, strict=True):
        for name in a:
            torch.testing.assert_close(a[name], b[name], **tol)


def test_a_capture_keeps_the_live_slots():
    """Capturing a new bucket's graph runs the step on its rows: live sequences there must survive it."""
    lm = mambavl.create("tiny-cobra", device="cuda").lm
    decoder = GraphDecoder(lm, 8)
    decoder.prepare(2)
    live = lm.new_state(3).map(lambda t: torch.randn_like(t))
    decoder.load(live)
    decoder.prepare(3)  # bucket 4: a new capture over rows 0..3
    for mine, theirs in zip(decoder.read([0, 1, 2]).layers, live.layers, strict=True):
        for name in mine:
            assert torch.equal(mine[name], theirs[name])


@pytest.mark.parametrize(
    ("preset", "decoder", "longest"),
    [("tiny-cobra", GraphDecoder, 19), ("tiny-cobra-nemotron-h", KVGraphDecoder, 85)],
)
def test_the_engine_on_graphs_equals_generate(preset, decoder, longest):
    """Continuous batching through CUDA graphs (sequences joining and leaving between replays); with
    attention layers, rows pass from one cache-length graph to the next."""
    from serving import collect, drive, texts

    vlm = mambavl.create(preset, device="cuda")
    engine = Engine(vlm, EngineConfig(slots=4, prefill_batch=2))
    assert isinstance(engine.decoder, decoder)
    engine._warm_up()
    jobs = []
    step = (longest - 5) // 2
    for i in range(10):
        prompt = f"question {i}: " + "what is it? " * (i % 4)
        params = dict(max_new_tokens=5 + step * (i % 3), min_length=5 + step * (i % 3))
        jobs.append((collect(engine, None, prompt, **params)[1], prompt, params))
    drive(engine)
    for events, prompt, params in jobs:
        assert texts(events)[0] == vlm.generate(None, prompt, cuda_graphs=False, **params)
