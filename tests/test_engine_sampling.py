"""The engine's choice of next tokens (`Engine._choose`): greedy rows in one argmax, rows that sample from
the shared generator (or pick an argmax after penalties) in one call per set of options, seeded rows each
from their own generator; every row gets its own row's token, and a failure stays with its request."""

from functools import cache

import pytest
import torch

import mambavl
import mambavl.engine.scheduler as scheduler
from mambavl.engine.scheduler import Engine, EngineConfig, Failed, Request, _Sequence
from mambavl.vlm.sampling import SamplingParams, seeded_generator

VOCAB = 262  # tiny-cobra's byte tokenizer


@cache
def _engine() -> Engine:
    torch.manual_seed(0)
    return Engine(mambavl.create("tiny-cobra"), EngineConfig(slots=4))


def _row(events: list | None = None, ids=(), **params) -> _Sequence:
    p = SamplingParams(**params)
    sink = (events if events is not None else []).append
    generator = None if p.seed is None else seeded_generator(p.seed, "cpu")
    return _Sequence(Request(None, "", p, sink), 0, [5, 6], generator, ids=list(ids))


def _logits(rows: int, winners: list[int]) -> torch.Tensor:
    """Each row's logits peak at its winner (ties impossible), on the LM's padded width."""
    torch.manual_seed(1)
    logits = torch.randn(rows, VOCAB + 6)
    for b, w in enumerate(winners):
        logits[b, w] = 50.0
    return logits


def test_each_row_gets_its_own_token_whatever_its_group(monkeypatch):
    calls = []
    real = scheduler.next_tokens
    monkeypatch.setattr(
        scheduler, "next_tokens", lambda logits, *a, **k: calls.append(len(logits)) or real(logits, *a, **k)
    )
    winners = [10, 11, 12, 13, 14, 15, 16, 17]
    seqs = [
        _row(),  # greedy
        _row(do_sample=True, top_k=1),  # unseeded: one group of three
        _row(do_sample=True, top_k=1, max_new_tokens=9),  # other options that do not change sampling
        _row(do_sample=True, top_k=1, stop=("x",)),
        _row(do_sample=True, top_k=1, seed=3),  # seeded: alone
        _row(repetition_penalty=1.5),  # argmax after a penalty: a group of two
        _row(repetition_penalty=1.5, ids=[40]),
        _row(do_sample=True, top_k=2),  # alone in its group: row by row
    ]
    chosen = _engine()._choose(_logits(len(seqs), winners), seqs)
    assert chosen == winners
    assert sorted(calls) == [1, 1, 2, 3]  # the seeded row and the lone top_k=2 row one by one


def test_min_length_bars_the_end_of_text_only_where_it_applies():
    engine = _engine()
    eos = engine._eos
    seqs = [
        _row(do_sample=True, top_k=1, min_length=3, ids=[1]),
        _row(do_sample=True, top_k=1, min_length=3, ids=[1, 2, 3]),
    ]
    seqs += [_row(do_sample=True, top_k=1, min_length=3, ids=[7])]
    chosen = engine._choose(_logits(3, [eos, eos, eos]), seqs)
    assert chosen[0] != eos and chosen[2] != eos and chosen[1] == eos


def test_batched_sampling_draws_from_each_rows_distribution():
    """Rows of one group sample from their own softmax: 400 rows over 4 live tokens, two row kinds with
    different distributions, frequencies within a few standard deviations of the probabilities."""
    engine = _engine()
    torch.manual_seed(2)
    rows = 400
    logits = torch.full((rows, VOCAB + 6), float("-inf"))
    a = torch.tensor([2.0, 1.0, 0.0, -1.0])
    b = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    logits[: rows // 2, 20:24] = a
    logits[rows // 2 :, 20:24] = b
    seqs = [_row(do_sample=True, temperature=1.0) for _ in range(rows)]
    chosen = torch.tensor(engine._choose(logits, seqs))
    for half, dist in ((chosen[: rows // 2], a.softmax(0)), (chosen[rows // 2 :], b.softmax(0))):
        freq = torch.stack([(half == 20 + k).float().mean() for k in range(4)])
        std = (dist * (1 - dist) / (rows // 2)).sqrt()
        assert ((freq - dist).abs() <= 4 * std + 1e-9).all(), (freq, dist)


def test_a_group_that_fails_falls_back_row_by_row(monkeypatch):
    """A batched call that raises is retried one row at a time: the rows are answered, and a row whose own
    sampling fails fails its request alone."""
    real = scheduler.next_tokens

    def flaky(logits, params, history, *a, **k):
        if len(logits) > 1:
            raise RuntimeError("a batch of rows went wrong")
        if history[0] and history[0][-1] == 99:  # the row at fault
            raise RuntimeError("this row went wrong")
        return real(logits, params, history, *a, **k)

    monkeypatch.setattr(scheduler, "next_tokens", flaky)
    events: list = []
    seqs = [
        _row(repetition_penalty=1.2),
        _row(events, repetition_penalty=1.2, ids=[99]),
        _row(repetition_penalty=1.2),
    ]
    chosen = _engine()._choose(_logits(3, [30, 31, 32]), seqs)
    assert chosen == [30, None, 32]
    assert isinstance(events[-1], Failed) and "sampling failed" in events[-1].message


@pytest.mark.parametrize("seed", [0, 7])
def test_seeded_rows_repeat_their_draws(seed):
    engine = _engine()
    logits = torch.zeros(2, VOCAB + 6)
    first = engine._choose(logits, [_row(do_sample=True, seed=seed), _row(do_sample=True, seed=seed + 1)])
    again = engine._choose(logits, [_row(do_sample=True, seed=seed), _row(do_sample=True, seed=seed + 1)])
    assert first == again
