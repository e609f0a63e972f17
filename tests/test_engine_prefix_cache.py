"""The exact prefix-state cache: a prompt resumed from the state after its longest cached prefix gives the
state and next-token logits of prefilling it whole (Mamba-1, Mamba-2, Jamba with attention KV); the
snapshot after the image equals recomputing it; a different image never hits; budgets evict least
recently used snapshots, through an optional host tier."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import mambavl
from mambavl.engine.prefill import prefill, prompt_items
from mambavl.engine.prefix_cache import PrefixCache, Snapshot
from mambavl.engine.scheduler import Engine, EngineConfig, Finished, Request, Started
from mambavl.lm.state import LMState
from mambavl.serve.metrics import Metrics
from mambavl.vlm.model import PromptIds
from mambavl.vlm.sampling import SamplingParams
from serving import collect, drive, texts

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=["tiny-cobra", "tiny-mlmamba", "tiny-viper-jamba"])
def vlm(request):
    torch.manual_seed(0)
    model = mambavl.create(request.param)
    with torch.no_grad():  # random weights far enough from the initialisation to make states differ
        for p in model.lm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _prompt(vlm, text, image=True):
    pb = vlm.get_prompt_builder()
    tag = "<image>\n" if image and vlm.config.image_placement == "placeholder" else ""
    pb.add_turn("human", tag + text)
    return pb.get_prompt()


def _inputs(vlm, rows):
    """(prepared images, tokenized prompts) for rows of (PIL image or None, text)."""
    images = [None if im is None else vlm.preprocess(im) for im, _ in rows]
    prompts = [vlm.encode_prompt(_prompt(vlm, text, im is not None), im is not None) for im, text in rows]
    return images, prompts


def _extend(prompt: PromptIds, ids: list[int]) -> PromptIds:
    """The prompt with more token ids at its end."""
    if prompt.after:
        return PromptIds(prompt.before, [*prompt.after, *ids])
    return PromptIds([*prompt.before, *ids])


def _assert_same_state(got: LMState, want: LMState):
    for mine, theirs in zip(got.layers, want.layers, strict=True):
        for name in theirs:
            a, b = mine[name], theirs[name]
            if name in ("k", "v", "valid"):  # attention: compare the real positions only
                keep = mine["valid"][0] if name != "valid" else None
                if name == "valid":
                    assert a[0][a[0]].numel() == b[0][b[0]].numel()
                    continue
                a = a[0][:, keep]
                b = b[0][:, theirs["valid"][0]]
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"state {n}: {m}")


RED = Image.new("RGB", (40, 30), (200, 30, 30))
BLUE = Image.new("RGB", (30, 50), (10, 90, 200))


def test_uncached_prefill_equals_the_vlms(vlm):
    rows = [(RED, "What is in the image?"), (None, "Hello there, a text-only row"), (BLUE, "Hi")]
    images, prompts = _inputs(vlm, rows)
    out = prefill(vlm, images, prompts, None)
    state, logits, batch, ids = vlm.prefill_prompts([r[0] for r in rows], prompts)
    assert out.prompt_ids == ids and out.cached == [0, 0, 0]
    assert out.positions == batch.lengths.tolist()
    torch.testing.assert_close(out.logits, logits.float(), **TOL)
    for b in range(3):
        _assert_same_state(out.states[b], state.select([b]))


def test_resumed_prompts_equal_whole_prefill(vlm):
    cache = PrefixCache(budget_bytes=1 << 30)
    first = [(RED, "What is in the image?"), (BLUE, "Describe it.")]
    images, prompts = _inputs(vlm, first)
    cold = prefill(vlm, images, prompts, cache)
    assert cold.cached == [0, 0] and cache.stats.hits == 0
    # the same prompts again: whole hits, no prefill
    again = prefill(vlm, images, prompts, cache)
    assert again.cached == again.positions == cold.positions
    torch.testing.assert_close(again.logits, cold.logits, **TOL)
    # longer prompts sharing those prefixes exactly (token ids), a new question about a cached image,
    # and a new image
    ext = [
        _extend(prompts[0], [5, 6, 7]),
        _inputs(vlm, [(BLUE, "Another question entirely")])[1][0],
        _inputs(vlm, [(Image.new("RGB", (30, 50), (10, 90, 201)), "Describe it.")])[1][0],
    ]
    ext_images = [images[0], images[1], vlm.preprocess(Image.new("RGB", (30, 50), (10, 90, 201)))]
    warm = prefill(vlm, ext_images, ext, cache)
    whole = prefill(vlm, ext_images, ext, None)
    image_positions = vlm.image_positions(images[1])
    before_blue = len(ext[1].before) if vlm.config.image_placement == "placeholder" else 0
    assert warm.cached[0] == cold.positions[0]  # resumed at the end of the first prompt
    assert warm.cached[1] == image_positions + before_blue  # resumed after the image
    assert warm.cached[2] == 0  # one pixel differs: never a hit
    assert warm.positions == whole.positions
    torch.testing.assert_close(warm.logits, whole.logits, **TOL)
    for b in range(3):
        _assert_same_state(warm.states[b], whole.states[b])


def test_snapshot_after_the_image_equals_recomputing_it(vlm):
    """The state kept after the image (the regression case of DESIGN.md §5) equals a fresh prefill of
    exactly the positions up to the image's end."""
    cache = PrefixCache(budget_bytes=1 << 30)
    images, prompts = _inputs(vlm, [(RED, "What is in the image?")])
    prefill(vlm, images, prompts, cache)
    items, at = prompt_items(vlm, images[0], prompts[0])
    n, snap = cache.lookup(items[: at + 1])
    assert n == at + 1
    embeds = vlm.image_embeddings([images[0]])[0]
    if at:
        embeds = torch.cat([vlm.lm.embed(torch.tensor([prompts[0].before]))[0], embeds.to(vlm.lm.dtype)])
    state = vlm.lm.new_state(1)
    hidden = vlm.prefill(embeds[None], torch.tensor([embeds.shape[0]]), state)
    assert snap.positions == embeds.shape[0]
    torch.testing.assert_close(snap.logits, vlm.lm.lm_head(hidden)[0].float(), **TOL)
    _assert_same_state(snap.state, state)


def test_image_digest_is_computed_while_preprocessing_and_tells_images_apart(vlm):
    """`preprocess` (a server's worker threads) leaves the digest computed, so the engine's thread never
    hashes pixels; the same picture gives the same digest, another picture or size another."""
    red, again, blue = (vlm.preprocess(img) for img in (RED, RED.copy(), BLUE))
    assert "digest" in vars(red) and "digest" in vars(blue)
    assert red.digest == again.digest != blue.digest
    assert vlm.preprocess(RED.resize((41, 30))).digest != red.digest


def test_too_long_after_a_hit_is_refused(vlm):
    cache = PrefixCache(budget_bytes=1 << 30)
    images, prompts = _inputs(vlm, [(RED, "What?")])
    prefill(vlm, images, prompts, cache)
    p = prompts[0]
    long = _extend(p, [3] * vlm.config.max_length)
    with pytest.raises(ValueError, match="shorten the prompt"):
        prefill(vlm, images, [long], cache)


# ---- the cache alone --------------------------------------------------------------------------------------
def _snap(nbytes_floats: int, positions: int = 1) -> Snapshot:
    state = LMState([{"ssm": torch.zeros(1, nbytes_floats)}])
    return Snapshot(state, torch.zeros(0), positions)


def test_longest_exact_prefix_and_lru_eviction():
    cache = PrefixCache(budget_bytes=2 * 400)  # two snapshots of 100 floats
    cache.insert([1, 2], _snap(100, 2))
    cache.insert([1, 2, 3, 4], _snap(100, 4))
    n, snap = cache.lookup([1, 2, 3, 4, 5])
    assert (n, snap.positions) == (4, 4)
    assert cache.lookup([1, 2, 3])[0] == 2
    assert cache.lookup([2, 1]) is None
    assert cache.lookup([("image", "a"), 1]) is None
    cache.insert([9], _snap(100))  # evicts the least recently used: [1, 2, 3, 4]
    assert cache.lookup([1, 2, 3, 4])[0] == 2
    assert cache.stats.evictions == 1 and cache.stats.bytes_device == 800 and len(cache) == 2
    cache.insert([7], _snap(1000))  # larger than the budget: never kept
    assert cache.lookup([7]) is None and len(cache) == 2


def test_host_tier_keeps_what_the_device_evicts():
    cache = PrefixCache(budget_bytes=400, host_budget_bytes=800)
    cache.insert([1], _snap(100))
    cache.insert([2], _snap(100))  # [1] moves to the host tier
    assert cache.stats.demotions == 1 and cache.stats.bytes_host == 400 and cache.stats.evictions == 0
    n, _ = cache.lookup([1, 5])  # back to the device; [2] to the host
    assert n == 1 and cache.stats.bytes_device == 400 and cache.stats.bytes_host == 400
    assert cache.lookup([2])[0] == 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.lists(st.integers(0, 3), min_size=1, max_size=4), st.integers(1, 6)),
        max_size=40,
    ),
    st.integers(0, 3),
    st.integers(0, 3),
)
def test_budgets_hold_under_any_sequence(ops, device_slots, host_slots):
    """Byte counts always equal what each tier holds and stay within the budgets; a hit is always a prefix
    of the items looked up."""
    cache = PrefixCache(budget_bytes=device_slots * 400, host_budget_bytes=host_slots * 400)
    latest = {}  # items -> the id (positions) of the snapshot inserted last for them
    for number, (insert, items, size) in enumerate(ops):
        if insert:
            cache.insert(items, _snap(100 * size, positions=number))
            latest[tuple(items)] = number
        else:
            hit = cache.lookup(items)
            if hit is not None:  # the snapshot inserted last for exactly that prefix
                n, snap = hit
                assert snap.positions == latest[tuple(items[:n])]
        dev = sum(e.snapshot.nbytes for e in cache._device.values())
        host = sum(e.snapshot.nbytes for e in cache._host.values())
        assert cache.stats.bytes_device == dev <= cache.budget_bytes
        assert cache.stats.bytes_host == host <= cache.host_budget_bytes
        assert cache.stats.entries == len(cache)


# ---- through the serving engine ------------------------------------------------------------------------
def _round(engine, vlm, rows, **params):
    """Queues rows of (image, prompt text), runs them to the end; (answers, Started events)."""
    jobs = [collect(engine, image, prompt, **params) for image, prompt in rows]
    drive(engine)
    started = [next(e for e in events if isinstance(e, Started)) for _, events in jobs]
    return [texts(events)[0] for _, events in jobs], started


def test_engine_answers_equal_with_the_cache_on_and_off(vlm):
    """Greedy answers with the cache on equal those with it off, on first sight and when resumed (whole
    prompt, after the image, after a previous answer); cached_tokens counts exactly what was resumed."""
    params = dict(max_new_tokens=6, do_sample=False)
    rows = [(RED, _prompt(vlm, "What is in the image?")), (BLUE, _prompt(vlm, "Describe it."))]
    off = Engine(vlm, EngineConfig(slots=4, prefix_cache_gb=0))
    metrics = Metrics(4)
    on = Engine(vlm, EngineConfig(slots=4), metrics=metrics)
    assert off.cache is None and on.cache is not None
    want, _ = _round(off, vlm, rows, **params)
    first, started = _round(on, vlm, rows, **params)
    assert first == want and [s.cached_tokens for s in started] == [0, 0]
    again, started = _round(on, vlm, rows, **params)
    assert again == want
    assert [s.cached_tokens for s in started] == [s.prompt_tokens for s in started]
    # a new question about a cached image resumes after the image
    new = [(BLUE, _prompt(vlm, "And now a different question?"))]
    got, started = _round(on, vlm, new, **params)
    assert got == _round(off, vlm, new, **params)[0]
    images, prompts = _inputs(vlm, [(BLUE, "And now a different question?")])
    _, at = prompt_items(vlm, images[0], prompts[0])
    assert started[0].cached_tokens == vlm.image_positions(images[0]) + at
    # the next turn of a conversation resumes at least from the end of the previous prompt
    pb = vlm.get_prompt_builder()
    tag = "<image>\n" if vlm.config.image_placement == "placeholder" else ""
    pb.add_turn("human", tag + "What is in the image?")
    pb.add_turn("gpt", want[0])
    pb.add_turn("human", "Are you sure?")
    turn2 = [(RED, pb.get_prompt())]
    got, started = _round(on, vlm, turn2, **params)
    assert got == _round(off, vlm, turn2, **params)[0]
    first_prompt = _inputs(vlm, [(RED, "What is in the image?")])
    assert started[0].cached_tokens >= prefill(vlm, *first_prompt, None).positions[0]
    assert metrics.prefix_cache_hits._value.get() == on.cache.stats.hits >= 4
    assert metrics.prefix_cache_bytes.labels(tier="device")._value.get() == on.cache.stats.bytes_device > 0


def test_a_cached_answer_resumes_the_next_turn_exactly(vlm):
    """The state kept at the end of an answer is the prompt + the answer's tokens fed so far: a prompt that
    is exactly those ids resumes from it whole and continues as prefilling it would."""
    engine = Engine(vlm, EngineConfig(slots=2))
    images, prompts = _inputs(vlm, [(RED, "What is in the image?")])
    _, events = _round_tokens(engine, images[0], prompts[0])
    finished = next(e for e in events if isinstance(e, Finished))
    assert finished.tokens == 5
    items, _ = prompt_items(vlm, images[0], prompts[0])
    # the answer's snapshot is keyed by the prompt's items + the fed ids
    keys = [e.items for e in engine.cache._device.values() if len(e.items) > len(items)]
    assert len(keys) == 1 and keys[0][: len(items)] == tuple(items)
    fed = list(keys[0][len(items) :])
    assert len(fed) == 4  # five tokens chosen by length, the last one never fed
    longer = _extend(prompts[0], fed)
    resumed = prefill(vlm, images, [longer], engine.cache)
    whole = prefill(vlm, images, [longer], None)
    assert resumed.cached[0] == whole.positions[0]
    torch.testing.assert_close(resumed.logits, whole.logits, **TOL)
    _assert_same_state(resumed.states[0], whole.states[0])


def _round_tokens(engine, image, tokens):
    events: list = []
    request = Request(image, "", SamplingParams(max_new_tokens=5, min_length=5), events.append)
    request.tokens = tokens
    engine._waiting.append(request)
    drive(engine)
    return request, events


def test_prefill_in_small_steps_equals_at_once(vlm):
    """A job advanced 5 positions a step (rows in turn, pieces cut at the snapshot boundaries) ends in the
    states and logits of prefilling at once, and keeps the same snapshots."""
    from mambavl.engine.prefill import PrefillJob

    rows = [(RED, "What is in the image? " * 3), (None, "A text-only row"), (BLUE, "Hi")]
    images, prompts = _inputs(vlm, rows)
    whole = prefill(vlm, images, prompts, None)
    cache = PrefixCache(budget_bytes=1 << 30)
    job = PrefillJob(vlm, images, prompts, cache)
    steps = 0
    while not job.done:
        assert 0 < job.step(5) <= 5
        steps += 1
    assert steps >= sum(whole.positions) // 5
    out = job.result()
    assert out.positions == whole.positions and out.prompt_ids == whole.prompt_ids
    torch.testing.assert_close(out.logits, whole.logits, **TOL)
    for b in range(3):
        _assert_same_state(out.states[b], whole.states[b])
    assert len(cache) == 5  # after each image and at each prompt's end


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["tiny-cobra", "tiny-mlmamba"])
def test_a_prefill_job_never_waits_for_the_device(preset):
    """A burst's prefill (towers, rows, LM steps, snapshots) only queues work: the engine's thread goes on
    to the next while the GPU runs it. PyTorch raises on any operation that would wait for the GPU."""
    from mambavl.bench.serve import synthetic_image
    from mambavl.engine.prefill import PrefillJob

    vlm = mambavl.create(preset, device="cuda", dtype=torch.bfloat16)
    engine = Engine(vlm, EngineConfig(slots=8))

    def run(seed: int) -> PrefillJob:
        images = [vlm.preprocess(synthetic_image(64, seed + i)) for i in range(4)]
        prompts = [engine.encode(f"Describe it. ({seed + i})" * (1 + i), im) for i, im in enumerate(images)]
        job = PrefillJob(vlm, images, prompts, engine.cache, graphs=True)
        while not job.done:
            job.step()
        return job

    with torch.inference_mode():
        for seed in (0, 100):  # graphs captured and pinned memory allocated outside the check
            run(seed)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            job = run(200)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(row.done for row in job.rows)
