"""One row's prefill from CUDA graphs (`vlm.prefill_graphs`): on the CPU, the graphs' very calls run eagerly
(`capture=False`) against the plain forward; on a GPU, the captured graphs against eager prefill, and the
engine's answers with them against answers without."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mambavl
from mambavl.lm.state import LMState
from mambavl.vlm.graphs import GraphCaptureError
from mambavl.vlm.prefill_graphs import PrefillGraphs, prefill_graph_support

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _lm(preset: str, device: str = "cpu"):
    torch.manual_seed(0)
    return mambavl.create(preset, device=device).lm


def _close_states(got, want):
    for mine, theirs in zip(got.layers, want.layers, strict=True):
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-5)
    assert got.seqlen == want.seqlen


@torch.no_grad()
@pytest.mark.parametrize("preset", ["tiny-cobra", "tiny-mlmamba"])
def test_graph_calls_equal_the_plain_forward_from_a_state(preset):
    """One row from a state mid-sequence, of lengths inside, at and past bucket edges: the same hidden
    state at the last position and the same state after, whatever the buffers held from longer calls."""
    lm = _lm(preset)
    graphs = PrefillGraphs(lm, buckets=(4, 16, 64), rows=(1, 2, 4), positions=64, capture=False)
    gen = torch.Generator().manual_seed(1)
    start = lm.new_state(1)
    lm(torch.randint(0, lm.config.vocab_size, (1, 9), generator=gen), state=start)
    for n in (64, 1, 3, 4, 5, 16, 17, 40):  # the longest first: later calls leave stale tails behind
        embeds = torch.randn(1, n, lm.config.d_model, generator=gen)
        want_state, got_state = start.clone(), start.clone()
        want = lm(inputs_embeds=embeds, state=want_state, return_hidden=True)[:, -1]
        got = graphs(embeds, got_state)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        _close_states(got_state, want_state)


@torch.no_grad()
@pytest.mark.parametrize("preset", ["tiny-cobra", "tiny-mlmamba"])
def test_graph_calls_of_several_ragged_rows_equal_each_row_alone(preset):
    """Three rows from different states, right-padded to different lengths (a padding row fills the bucket
    of four), after a call that left other rows and lengths in the buffers: each row equals itself alone."""
    lm = _lm(preset)
    graphs = PrefillGraphs(lm, buckets=(4, 16, 64), rows=(1, 2, 4), positions=64, capture=False)
    gen = torch.Generator().manual_seed(2)
    graphs(torch.randn(4, 16, lm.config.d_model, generator=gen), lm.new_state(4))  # stale buffers
    starts = []
    for k in range(3):
        s = lm.new_state(1)
        lm(torch.randint(0, lm.config.vocab_size, (1, 5 + k), generator=gen), state=s)
        starts.append(s)
    lengths = torch.tensor([7, 13, 2])
    embeds = torch.randn(3, 13, lm.config.d_model, generator=gen)
    state = LMState.stack([s.clone() for s in starts])
    got = graphs(embeds, state, lengths)
    for b in range(3):
        want_state = starts[b].clone()
        want = lm(inputs_embeds=embeds[b : b + 1, : lengths[b]], state=want_state, return_hidden=True)[:, -1]
        torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)
        for mine, theirs in zip(state.select([b]).layers, want_state.layers, strict=True):
            for name in mine:
                torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_graph_calls_take_a_right_padded_row():
    lm = _lm("tiny-cobra")
    graphs = PrefillGraphs(lm, buckets=(16,), rows=(1,), capture=False)
    embeds = torch.randn(1, 12, lm.config.d_model)
    want_state, got_state = lm.new_state(1), lm.new_state(1)
    want = lm(inputs_embeds=embeds[:, :7], state=want_state, return_hidden=True)[:, -1]
    got = graphs(embeds, got_state, torch.tensor([7]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(got_state.layers, want_state.layers, strict=True):
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-5)


def test_which_calls_the_graphs_take():
    """One row up to the longest bucket; several rows while their padded positions fit the budget; larger
    calls run eagerly."""
    graphs = PrefillGraphs(
        _lm("tiny-cobra"), buckets=(16, 64, 256), rows=(1, 2, 4), positions=256, capture=False
    )
    assert graphs.bucket(1, 200) == (1, 256) and graphs.bucket(1, 257) is None
    assert graphs.bucket(3, 50) == (4, 64) and graphs.bucket(3, 65) is None  # 4 × 256 > 256
    assert graphs.bucket(5, 1) is None and graphs.bucket(0, 4) is None and graphs.bucket(1, 0) is None
    assert graphs.shapes() == [(1, 16), (1, 64), (1, 256), (2, 16), (2, 64), (4, 16), (4, 64)]


def test_what_cannot_be_captured_says_why():
    assert "CUDA" in prefill_graph_support(_lm("tiny-cobra"))
    assert "KV caches" in prefill_graph_support(_lm("tiny-viper-jamba"))
    with pytest.raises(ValueError, match="cannot prefill"):
        PrefillGraphs(_lm("tiny-cobra"))
    graphs = PrefillGraphs(_lm("tiny-cobra"), buckets=(8,), rows=(1,), capture=False)
    with pytest.raises(ValueError, match="no prefill graph takes 1 rows of 9"):
        graphs.prepare(1, 9)
    with pytest.raises(ValueError, match="a state of B sequences"):
        graphs(torch.zeros(2, 3, graphs.lm.config.d_model), graphs.lm.new_state(1))
    assert mambavl.create("tiny-cobra").prefill_graphs() is None  # on the CPU: eager prefill


@cuda
@pytest.mark.usefixtures("exact_fp32")
@pytest.mark.parametrize("preset", ["tiny-cobra", "tiny-mlmamba"])
def test_captured_prefill_equals_eager_on_the_gpu(preset):
    vlm = mambavl.create(preset, device="cuda")
    lm = vlm.lm
    graphs = vlm.prefill_graphs()
    assert graphs is not None and vlm.prefill_graphs() is graphs
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        for rows, n in (
            (1, 2048),
            (1, 1),
            (1, 15),
            (3, 16),
            (1, 17),
            (2, 300),
            (1, 1500),
            (16, 200),
            (5, 40),
        ):
            embeds = torch.randn(rows, n, lm.config.d_model, device="cuda", generator=gen)
            lengths = torch.randint(1, n + 1, (rows,), device="cuda", generator=gen)
            lengths[0] = n
            eager_state, graph_state = lm.new_state(rows), lm.new_state(rows)
            want = vlm.prefill(embeds, lengths, eager_state, graphs=False)
            got = vlm.prefill(embeds, lengths, graph_state)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            for mine, theirs in zip(graph_state.layers, eager_state.layers, strict=True):
                for name in mine:
                    torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-4)
    want = {(1, 2048), (1, 1536), (1, 16), (4, 16), (1, 64), (2, 512), (16, 256), (8, 64)}
    assert set(graphs.graphs) == want


class FailingGraphs:
    """Stands for `PrefillGraphs` where every capture fails."""

    def __init__(self, lm):
        pass

    def valid_for(self, lm):
        return True

    def bucket(self, rows, length):
        return (1, 16)

    def _fail(self, *args, **kwargs):
        raise GraphCaptureError("capturing the prefill of 1 × 16 positions failed: (simulated)")

    __call__ = warm = _fail


@pytest.fixture
def failing_graphs(monkeypatch):
    import mambavl.vlm.model as model

    monkeypatch.setattr(model, "prefill_graph_support", lambda lm: None)
    monkeypatch.setattr(model, "PrefillGraphs", FailingGraphs)


@torch.no_grad()
@pytest.mark.usefixtures("failing_graphs")
def test_a_failed_capture_prefills_eagerly_from_then_on():
    """A graph that cannot be captured costs a RuntimeWarning once; the prefill is the eager one."""
    import warnings

    vlm = mambavl.create("tiny-cobra")
    embeds = torch.randn(1, 10, vlm.config.lm.d_model)
    lengths = torch.tensor([10])
    want = vlm.prefill(embeds, lengths, vlm.lm.new_state(1), graphs=False)
    with pytest.warns(RuntimeWarning, match="prefill runs eagerly: capturing"):
        got = vlm.prefill(embeds, lengths, vlm.lm.new_state(1))
    torch.testing.assert_close(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(vlm.prefill(embeds, lengths, vlm.lm.new_state(1)), want)
    assert vlm.prefill_graphs() is None


@pytest.mark.usefixtures("failing_graphs")
def test_warming_graphs_that_fail_turns_them_off():
    vlm = mambavl.create("tiny-cobra")
    with pytest.warns(RuntimeWarning, match="prefill runs eagerly"):
        vlm.warm_graphs()
    assert vlm.prefill_graphs() is None
    vlm.warm_graphs()  # nothing left to warm: no warning


def test_state_slots_stay_within_their_memory_budget(monkeypatch):
    """Graphs of several rows hold that many states: models with large states (Mamba-2) get fewer rows."""
    import mambavl.vlm.prefill_graphs as module

    lm = _lm("tiny-mlmamba")
    monkeypatch.setattr(module, "STATE_BYTES", 3 * lm.new_state(1).nbytes)
    graphs = PrefillGraphs(lm, rows=(1, 2, 4, 8), capture=False)
    assert graphs.rows == (1, 2) and graphs.state.batch_size == 2
    assert graphs.bucket(3, 16) is None and graphs.bucket(2, 16) == (2, 16)


@pytest.fixture(scope="module")
def shared_graphs():
    """One set of graph calls for every example: each runs after whatever the previous one left behind."""
    lm = _lm("tiny-mlmamba")
    return lm, PrefillGraphs(lm, buckets=(8, 32, 64), rows=(1, 2, 4, 8), positions=256, capture=False)


@torch.no_grad()
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    padded=st.integers(0, 8),
    seed=st.integers(0, 2**16),
)
def test_any_batch_the_graphs_take_equals_its_rows_alone(shared_graphs, lengths, padded, seed):
    """Property: for any rows of any real lengths (right-padded by any amount), from any states, after any
    earlier call, the graphs' call gives each row's hidden state and state as that row alone would."""
    lm, graphs = shared_graphs
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths) + padded
    if graphs.bucket(len(lengths), width) is None:
        return  # a call the graphs do not take runs eagerly (VLM.prefill)
    starts = []
    for _ in lengths:
        s = lm.new_state(1)
        prefix = int(torch.randint(1, 6, (1,), generator=gen))
        lm(torch.randint(0, lm.config.vocab_size, (1, prefix), generator=gen), state=s)
        starts.append(s)
    embeds = torch.randn(len(lengths), width, lm.config.d_model, generator=gen)
    state = LMState.stack([s.clone() for s in starts])
    got = graphs(embeds, state, torch.tensor(lengths))
    for b, n in enumerate(lengths):
        alone = starts[b].clone()
        want = lm(inputs_embeds=embeds[b : b + 1, :n], state=alone, return_hidden=True)[:, -1]
        torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)
        for mine, theirs in zip(state.select([b]).layers, alone.layers, strict=True):
            for name in mine:
                torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-5)
