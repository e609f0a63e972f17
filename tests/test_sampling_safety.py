"""The sampler never fails and never picks a token it must not, whatever the settings `SamplingParams`
admits and whatever the logits hold (NaN, ±inf, the float32 extremes): its answer is always a real
vocabulary id (never one of the LM's padded rows), and a distribution with one token left (a vanishing
temperature, a vanishing top_p, top_k=1) gives that token, its argmax. Property tests (hypothesis,
derandomized: the same examples every run)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mambavl.vlm.sampling import SEED_END, SamplingParams, greedy_tokens, next_tokens, seeded_generator

# derandomized and without a database of past failures: every run tries the same examples
PROPERTY = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
EXTREME = [0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1e30, -1e30, math.inf, -math.inf, math.nan]
TINY = [5e-324, 1e-320, 1e-300, 1e-45, 1.4e-45, 1e-38]  # temperatures and top_p far under float32's range
HUGE = [1e30, 3.4e38, 1e300, 1.7e308]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Rows of a dozen logits: a second CPU thread only adds waiting (much of it on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logit_values():
    return st.one_of(
        st.sampled_from(EXTREME), st.floats(width=32), st.floats(-10, 10, allow_nan=False, width=32)
    )


@st.composite
def logit_rows(draw, finite: bool = False):
    """(logits [B, vocab + padding], vocab): the padded columns hold the largest values, as a trap."""
    vocab = draw(st.integers(1, 12))
    padding = draw(st.integers(0, 3))
    batch = draw(st.integers(1, 3))
    values = st.floats(-30, 30, allow_nan=False, width=32) if finite else logit_values()
    rows = [
        draw(st.lists(values, min_size=vocab, max_size=vocab)) + [math.inf] * padding for _ in range(batch)
    ]
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return torch.tensor(rows, dtype=torch.float32).to(dtype), vocab


def positive(extremes: list[float], upper: float = 1e308):
    return st.one_of(st.sampled_from(extremes), st.floats(0, upper, exclude_min=True, allow_infinity=False))


@st.composite
def sampling_params(draw):
    return SamplingParams(
        do_sample=draw(st.booleans()),
        temperature=draw(positive(TINY + HUGE)),
        top_k=draw(st.one_of(st.integers(0, 15), st.just(10**30))),
        top_p=draw(st.one_of(st.sampled_from([*TINY, 1.0]), st.floats(0, 1, exclude_min=True))),
        repetition_penalty=draw(positive(TINY + HUGE + [1.0])),
        presence_penalty=draw(st.sampled_from([-2.0, 0.0, 2.0])),
        frequency_penalty=draw(st.sampled_from([-2.0, 0.0, 2.0])),
        min_length=draw(st.integers(0, 2)),
    )


@PROPERTY
@given(
    case=logit_rows(),
    params=sampling_params(),
    history=st.lists(st.integers(-2, 20), max_size=8),
    step=st.integers(0, 3),
    seed=st.integers(0, SEED_END - 1),
)
def test_always_a_real_token(case, params, history, step, seed):
    """Any logits, any admitted settings, a history with ids the head does not have: a vocabulary id."""
    logits, vocab = case
    generator = seeded_generator(seed, "cpu")
    before = logits.clone()
    ids = next_tokens(logits, params, [history] * len(logits), step, 0, vocab, generator)
    assert ids.shape == (len(logits),) and ids.dtype == torch.long
    assert ((ids >= 0) & (ids < vocab)).all(), ids
    assert torch.equal(logits.isnan(), before.isnan())
    assert torch.equal(logits.nan_to_num(), before.nan_to_num())  # the caller's logits are left alone


def _clear_argmax(logits: torch.Tensor, vocab: int, margin: float = 0.0) -> list[int]:
    """Each row's argmax, for examples where every row has one finite maximum, more than `margin` over
    the next logit."""
    row = logits[:, :vocab].double()
    row = row.masked_fill(row.isnan(), -math.inf)
    top2 = row.topk(min(2, vocab), dim=-1).values
    assume(bool(torch.isfinite(top2[:, 0]).all()))
    if vocab > 1:
        assume(bool((top2[:, 0] - top2[:, 1] > margin).all()))
    return row.argmax(-1).tolist()


@PROPERTY
@given(case=logit_rows(), temperature=st.sampled_from(TINY), seed=st.integers(0, 2**32))
def test_a_vanishing_temperature_gives_the_argmax(case, temperature, seed):
    """The reported failure: temperature 1e-45 (0 in float32, so logits/T were ±inf and NaN)."""
    logits, vocab = case
    # exp(-745) is 0 in float64: beyond that gap over the temperature, only the argmax is left
    expected = _clear_argmax(logits, vocab, margin=750 * temperature)
    params = SamplingParams(do_sample=True, temperature=temperature)
    ids = next_tokens(logits, params, [[]] * len(logits), 0, 0, vocab, seeded_generator(seed, "cpu"))
    assert ids.tolist() == expected


@PROPERTY
@given(
    case=logit_rows(),
    top_p=st.sampled_from([*TINY, 1e-12]),
    temperature=st.one_of(st.just(1.0), positive(TINY + HUGE)),
    seed=st.integers(0, 2**32),
)
def test_a_vanishing_top_p_gives_the_argmax(case, top_p, temperature, seed):
    """The reported failure: a tiny top_p at temperature 1 (top_p 0 in float32 dropped every token).
    At any temperature, even one that flattens the scaled logits to ties, the best logit is the one kept."""
    logits, vocab = case
    expected = _clear_argmax(logits, vocab)
    params = SamplingParams(do_sample=True, temperature=temperature, top_p=top_p)
    ids = next_tokens(logits, params, [[]] * len(logits), 0, 0, vocab, seeded_generator(seed, "cpu"))
    assert ids.tolist() == expected


@PROPERTY
@given(case=logit_rows(), temperature=positive(TINY + HUGE), seed=st.integers(0, 2**32))
def test_top_k_one_gives_the_argmax_at_any_temperature(case, temperature, seed):
    logits, vocab = case
    expected = _clear_argmax(logits, vocab)
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=1)
    ids = next_tokens(logits, params, [[]] * len(logits), 0, 0, vocab, seeded_generator(seed, "cpu"))
    assert ids.tolist() == expected


@PROPERTY
@given(case=logit_rows(), params=sampling_params(), seed=st.integers(0, 2**32))
def test_nothing_finite_falls_back_and_infinite_logits_win(case, params, seed):
    """A row of NaN and -inf only has no distribution: a vocabulary id still comes. A row with +inf
    logits samples among them (the limit of the distribution)."""
    logits, vocab = case
    logits[0, :vocab] = math.nan
    if vocab > 1:
        logits[-1, :vocab] = -math.inf
        logits[-1, vocab - 1] = math.inf
    plain = SamplingParams(do_sample=params.do_sample, temperature=params.temperature, top_p=params.top_p)
    ids = next_tokens(logits, plain, [[]] * len(logits), 0, 0, vocab, seeded_generator(seed, "cpu"))
    assert ((ids >= 0) & (ids < vocab)).all()
    if vocab > 1:
        assert ids[-1] == vocab - 1


@PROPERTY
@given(case=logit_rows(finite=True), params=sampling_params(), seed=st.integers(0, 2**32))
def test_the_same_seed_gives_the_same_tokens(case, params, seed):
    logits, vocab = case
    draws = [
        next_tokens(logits, params, [[1, 2]] * len(logits), 0, 0, vocab, seeded_generator(seed, "cpu"))
        for _ in range(2)
    ]
    assert torch.equal(*draws)


def test_greedy_never_picks_nan():
    """torch's argmax takes NaN as the largest value; the engine's batched greedy rows must not."""
    logits = torch.tensor([[1.0, math.nan, 3.0], [math.nan, math.nan, -math.inf], [-1.0, math.inf, math.nan]])
    for picks in (
        greedy_tokens(logits).tolist(),
        next_tokens(logits, SamplingParams(), [[]] * 3, 0, 0, 3).tolist(),
    ):
        assert picks[0] == 2 and picks[2] == 1 and 0 <= picks[1] < 3  # row 1 has no candidate: any id


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 0.0),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", math.nan),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", 0.0),
        ("presence_penalty", math.inf),
        ("frequency_penalty", math.nan),
        ("seed", SEED_END),
        ("seed", -(2**63) - 1),
        ("seed", 1.5),
        ("seed", True),
    ],
)
def test_settings_outside_the_safe_range_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field}=.* is invalid"):
        SamplingParams(**{field: value})


def test_seeds_take_every_64_bit_integer():
    """The seed 2**64 killed the server's engine; every seed torch takes is accepted, and negative ones
    are read modulo 2**64 as torch does, so that `seed + i` of n choices never overflows."""
    assert SamplingParams(seed=SEED_END - 1).seed == SEED_END - 1
    assert SamplingParams(seed=-1).seed == SEED_END - 1
    assert SamplingParams(seed=-(2**63)).seed == 2**63
    assert seeded_generator(SEED_END - 1, "cpu", offset=3).initial_seed() == 2
    a = torch.rand(4, generator=seeded_generator(SamplingParams(seed=-1).seed, "cpu"))
    b = torch.rand(4, generator=torch.Generator().manual_seed(-1))
    assert torch.equal(a, b)
