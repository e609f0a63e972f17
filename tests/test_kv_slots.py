"""`KVSlotDecoder`: every slot of a model with attention layers steps in one batched call, its KV caches in
per-slot buffers. Rows of different lengths, joining and leaving, buffers growing as rows pass their
length: each row's logits equal decoding it alone, and the states read back are the rows' own."""

import pytest
import torch

import refmodels
from mambavl.lm import load_lm
from mambavl.vlm.graphs import KVGraphDecoder, KVSlotDecoder, slot_decoder


@pytest.fixture(
    scope="module",
    params=[
        "jamba-attn-moe-gqa",
        "falcon_h1-parallel-multipliers",
        "zamba2-shared-adapters-rope",
        "nemotron_h-hybrid-groups-gqa",
    ],
)
def lm(request, tmp_path_factory):
    return load_lm(refmodels.save(refmodels.make(request.param), tmp_path_factory.mktemp(request.param)))


@pytest.fixture(params=["eager", "graph-steps"])
def make_decoder(request, lm):
    """The eager slots, or the steps `KVGraphDecoder` captures (views of its buffers cut to a length
    bucket, cache counts kept on the host) run eagerly: what the graphs replay, on the CPU."""
    if request.param == "eager":
        decoder = slot_decoder(lm, capacity=4, cuda_graphs=False)
        assert isinstance(decoder, KVSlotDecoder)
        return decoder
    return KVGraphDecoder(lm, 4, length=64, capture=False)


@torch.no_grad()
def test_batched_slots_equal_rows_decoded_alone(lm, make_decoder):
    vocab = lm.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (1, n), generator=gen) for n in (5, 61, 13)]
    alone = []
    for ids in prompts:
        state = lm.new_state(1)
        logits = lm(ids, state=state)[:, -1]
        alone.append((state, logits))
    decoder = make_decoder
    for slot, (state, _) in enumerate(alone):
        decoder.load(state.clone(), [slot])
    live = [0, 1, 2]  # which prompt each slot holds
    tokens = torch.stack([logits.argmax(-1)[0] for _, logits in alone])
    for step in range(6):  # the 61-token row passes the buffers' first 64 positions: they grow (and a
        # graph decoder moves from its 64-position graphs to 128-position ones)
        if step == 3:  # the first row leaves: the last live slot moves into its place
            decoder.move(len(live) - 1, 0)
            live = [live[-1], *live[1:-1]]
            tokens = torch.cat([tokens[-1:], tokens[1:-1]])
        batched = decoder.step(tokens)
        for row, which in enumerate(live):
            state = alone[which][0]
            want = lm(tokens[row].view(1, 1), state=state)[:, -1]
            torch.testing.assert_close(batched[row : row + 1], want, rtol=1e-4, atol=1e-4)
        tokens = batched.argmax(-1)
    for row, which in enumerate(live):  # read back: the row's own state, its KV cache as long as its own
        got, want = decoder.read([row]), alone[which][0]
        for mine, theirs in zip(got.layers, want.layers, strict=True):
            assert mine.keys() == theirs.keys()
            for name in mine:
                torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 3, 40, 256])
def test_static_experts_equal_expert_by_expert(lm, tokens):
    """A decode step's experts with routing-independent shapes (each token's own experts gathered, or
    every expert weighted by the routing) give the sum that running each expert on its tokens gives."""
    from mambavl.lm.ffn import STATIC_TOKENS, MoE

    moes = [m for m in lm.modules() if isinstance(m, MoE)]
    if not moes:
        assert lm.config.static_shapes
        return
    torch.manual_seed(tokens)
    assert tokens <= STATIC_TOKENS
    for moe in moes:
        x = torch.randn(tokens, lm.config.d_model)
        weights, experts = moe.route(x)
        torch.testing.assert_close(
            moe._static(x, weights, experts), moe._by_expert(x, weights, experts), rtol=1e-5, atol=1e-6
        )


def test_experts_past_the_static_size_are_not_captured(lm):
    from mambavl.lm.ffn import STATIC_TOKENS

    if lm.config.static_shapes:
        return
    with pytest.raises(ValueError, match="more than"):
        KVGraphDecoder(lm, STATIC_TOKENS + 1, capture=False)


def test_the_engine_warms_every_cache_length_graph_up_front():
    """Before serving, an attention model's engine prepares the graph of every slot bucket at every cache
    length up to its warm length, on buffers already that long: no capture stalls the first requests."""
    import mambavl
    from mambavl.engine.scheduler import WARM_CACHE, Engine, EngineConfig

    vlm = mambavl.create("tiny-cobra-nemotron-h")
    decoder = KVGraphDecoder(vlm.lm, 6, capture=False)
    engine = Engine(vlm, EngineConfig(slots=6), decoder=decoder)
    engine._warm_up()
    longest = min(vlm.config.max_length, WARM_CACHE)
    lengths = [64 * 2**i for i in range(8) if 64 * 2**i <= longest]
    assert set(decoder.graphs) == {
        (size, length) for size in (1, 2, 4, 8) for length in lengths
    }  # 6 → bucket 8
    assert decoder.buffer_length == longest


@torch.no_grad()
def test_a_step_that_cannot_be_captured_decodes_eagerly(monkeypatch, lm):
    """If a capture fails (an op the graph cannot hold), the decoder says so and steps eagerly: the same
    logits as the eager slots."""
    from mambavl.vlm import graphs

    def fail(pool, step, state, before=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "capture", fail)
    decoder = KVGraphDecoder(lm, 2, capture=False)
    decoder.capture = True  # as on a GPU: the next new graph is captured, and fails
    eager = KVSlotDecoder(lm, 2)
    state = lm.new_state(2)
    lm(torch.randint(0, lm.config.vocab_size, (2, 9)), state=state)
    decoder.load(state.clone())
    eager.load(state.clone())
    tokens = torch.tensor([3, 5])
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        got = decoder.step(tokens)
    torch.testing.assert_close(got, eager.step(tokens))
    assert not decoder.capture
    torch.testing.assert_close(decoder.step(tokens), eager.step(tokens))
