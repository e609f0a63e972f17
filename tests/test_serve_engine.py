"""The serving engine: continuous batching over state slots gives every request the answer it gets alone
(`VLM.generate`), whatever joins and leaves around it; cancellation, timeouts, queue limits and bad
requests end only the request concerned."""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest
import torch
from PIL import Image

import mambavl
from mambavl.engine import scheduler as engine_module
from mambavl.engine.scheduler import (
    Delta,
    Engine,
    EngineConfig,
    Failed,
    Finished,
    QueueFull,
    Request,
    Started,
)
from mambavl.serve.metrics import Metrics
from mambavl.vlm.sampling import SamplingParams
from serving import collect, drive, texts


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    vlm = mambavl.load(demo_model_dir)
    data = demo_model_dir.parent / "data"
    rows = json.loads((data / "heldout.json").read_text())
    questions = []
    for row in rows:
        builder = vlm.get_prompt_builder()
        builder.add_turn("human", row["conversations"][0]["value"])
        questions.append((Image.open(data / "images" / row["image"]).convert("RGB"), builder.get_prompt()))
    return vlm, questions


def test_continuous_batching_equals_generate(demo):
    """12 requests of different lengths through 4 slots: they queue, join as slots free up, leave at
    different steps (the last live slot moves into each hole), and each answer equals `generate`."""
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=4, prefill_batch=3))
    jobs = []
    for i, (image, prompt) in enumerate(questions[:12]):
        params = dict(max_new_tokens=3 + 2 * (i % 5), min_length=2 * (i % 3))
        jobs.append(
            (
                collect(engine, image if i % 4 else None, prompt, **params),
                image if i % 4 else None,
                prompt,
                params,
            )
        )
    drive(engine)
    for (request, events), image, prompt, params in jobs:
        assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
        assert texts(events)[0] == vlm.generate(image, prompt, **params), request.id
    assert not engine._rows and not engine._waiting


def test_engine_thread_serves_concurrent_callers(demo):
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=3)).start()
    try:
        results = [None] * 8
        threads = [
            threading.Thread(
                target=lambda i=i: results.__setitem__(i, engine.generate(*questions[i], max_new_tokens=6))
            )
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [vlm.generate(*questions[i], max_new_tokens=6) for i in range(8)]
        assert engine.stats() == {"slots": 3, "active": 0, "prefilling": 0, "queued": 0}
    finally:
        engine.stop()


@pytest.mark.parametrize("preset", ["tiny-mlmamba", "tiny-viper-jamba"])
def test_other_families_equal_generate(preset):
    """Mamba-2 decodes in shared slots; the hybrid (attention KV caches) one state per row."""
    vlm = mambavl.create(preset)
    engine = Engine(vlm, EngineConfig(slots=2))
    image = Image.new("RGB", (40, 30), (10, 200, 90))
    jobs = []
    for i, q in enumerate(["a", "what is this", "tell me more"]):
        builder = vlm.get_prompt_builder()
        builder.add_turn("human", ("<image>\n" if i != 1 else "") + q)
        im = image if i != 1 else None
        params = dict(max_new_tokens=4 + i, min_length=4 + i)
        jobs.append((collect(engine, im, builder.get_prompt(), **params), im, builder.get_prompt(), params))
    drive(engine)
    for (_, events), im, prompt, params in jobs:
        assert texts(events)[0] == vlm.generate(im, prompt, **params)


def test_choices_share_the_prompt_and_are_seeded(demo):
    """n choices come from one prefill; choice i samples as a request seeded seed + i."""
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=4))
    params = dict(max_new_tokens=8, min_length=8, do_sample=True, temperature=1.5, seed=11)
    (_, events) = collect(engine, *questions[0], n=3, **params)
    singles = [collect(engine, *questions[0], **(params | {"seed": 11 + i}))[1] for i in range(3)]
    drive(engine)
    assert texts(events, 3) == [texts(s)[0] for s in singles]
    assert len(set(texts(events, 3))) > 1
    assert sum(isinstance(e, Started) for e in events) == 1


def test_stop_strings_end_the_answer_and_are_never_streamed(demo):
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=2))
    image, prompt = questions[0]
    full = vlm.generate(image, prompt, max_new_tokens=12, min_length=12)
    stop = full[3:5]
    (_, events) = collect(engine, image, prompt, max_new_tokens=12, min_length=12, stop=(stop,))
    drive(engine)
    assert texts(events)[0] == vlm.generate(image, prompt, max_new_tokens=12, min_length=12, stop=(stop,))
    assert texts(events)[0] == full[: full.find(stop)].strip()
    assert all(stop not in e.text for e in events if isinstance(e, Delta))
    assert events[-1] == Finished(0, "stop", events[-1].tokens)


def test_a_bad_request_fails_alone(demo):
    """A prompt over the model's length in a prefill batch: that request gets a 400, the others run."""
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=4, prefill_batch=4))
    good = [collect(engine, *questions[i], max_new_tokens=4) for i in range(3)]
    (_, bad) = collect(engine, None, "x" * (vlm.config.max_length + 5), max_new_tokens=4)
    drive(engine)
    assert len(bad) == 1 and isinstance(bad[0], Failed) and bad[0].status == 400
    assert "shorten the prompt" in bad[0].message
    for i, (_, events) in enumerate(good):
        assert texts(events)[0] == vlm.generate(*questions[i], max_new_tokens=4)


def test_the_next_step_is_queued_before_the_host_work(demo):
    """While rows go on, every engine step leaves the next decode step queued (the host's work on this one
    runs beside it); a row that joins meanwhile starts at the step after, a row that ends is skipped, the
    last step queues nothing, and every answer equals `generate` alone."""
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=2, prefill_batch=1))
    params = [dict(max_new_tokens=9, min_length=9), dict(max_new_tokens=2, min_length=2)]
    params.append(dict(max_new_tokens=5, min_length=5))
    jobs = [collect(engine, *questions[i], **params[i]) for i in range(3)]
    queued = []
    with torch.inference_mode():
        for _ in range(200):
            engine._drop_ended()
            engine._admit()
            if not engine._rows and not engine._waiting and not engine._jobs:
                break
            if engine._rows:
                engine._step_or_fail()
                queued.append(engine._inflight is not None)
    assert all(queued[:-1]) and not queued[-1] and engine._inflight is None
    for i, (_, events) in enumerate(jobs):
        assert texts(events)[0] == vlm.generate(*questions[i], **params[i])


def test_cancel_frees_the_slot_at_once(demo):
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=1))
    (long, events) = collect(engine, *questions[0], max_new_tokens=1000, min_length=1000)
    (_, after) = collect(engine, *questions[1], max_new_tokens=4)
    with torch.inference_mode():
        engine._admit()
        for _ in range(3):
            engine._step()
    assert len(engine._rows) == 1 and len(engine._waiting) == 1
    engine.cancel(long)
    drive(engine)
    assert not any(isinstance(e, Finished) for e in events)
    assert texts(after)[0] == vlm.generate(*questions[1], max_new_tokens=4)


def test_timeouts_and_the_queue_limit(demo):
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=1, max_queue=1, timeout=0.5)).start()
    try:
        sink: queue.Queue = queue.Queue()
        running = engine.submit(
            Request(*questions[0], SamplingParams(max_new_tokens=10**6, min_length=10**6), sink.put)
        )
        assert isinstance(sink.get(timeout=30), Started)
        waiting = engine.submit(Request(*questions[1], SamplingParams(max_new_tokens=4), lambda e: None))
        with pytest.raises(QueueFull, match="retry later"):
            engine.submit(Request(*questions[2], SamplingParams(max_new_tokens=4), lambda e: None))
        deadline = time.monotonic() + 30
        while not (running.done and waiting.done) and time.monotonic() < deadline:
            time.sleep(0.01)
        last = None
        while not sink.empty():
            last = sink.get()
        assert isinstance(last, Failed) and last.status == 504 and "timed out" in last.message
        assert waiting.done
        with pytest.raises(ValueError, match="more slots"):
            engine.submit(Request(None, "x", SamplingParams(), lambda e: None, n=2))
    finally:
        engine.stop()
    assert engine.stats()["active"] == 0


def test_stopping_the_engine_answers_everyone(demo):
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=1)).start()
    sink: queue.Queue = queue.Queue()
    engine.submit(Request(*questions[0], SamplingParams(max_new_tokens=10**6, min_length=10**6), sink.put))
    assert isinstance(sink.get(timeout=30), Started)
    engine.stop()
    events = []
    while not sink.empty():
        events.append(sink.get())
    assert isinstance(events[-1], Failed) and events[-1].status == 503
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit(Request(None, "x", SamplingParams(), lambda e: None))


def test_engine_config_is_checked():
    with pytest.raises(ValueError, match="slots"):
        EngineConfig(slots=0)
    with pytest.raises(ValueError, match="timeout"):
        EngineConfig(timeout=0)


# ---- hardening: nothing a request carries stops the engine or delays the others ---------------------------
def test_extreme_sampling_settings_answer(demo):
    """Settings at the edges of what is admitted once made the sampler raise in the engine thread (the
    server answered 503 from then on): each now answers, and a vanishing temperature or top_p decodes
    as greedy does (one token is left: the argmax)."""
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=4))
    image, prompt = questions[0]
    fixed = dict(max_new_tokens=6, min_length=6)
    greedy = vlm.generate(image, prompt, **fixed)
    settings = [
        dict(do_sample=True, temperature=1e-45, seed=1),
        dict(do_sample=True, temperature=1.0, top_p=5e-324, seed=2),
        dict(do_sample=True, temperature=1e300, top_k=10**30, seed=3),
        dict(do_sample=True, repetition_penalty=1e-300, seed=4),
        dict(do_sample=True, repetition_penalty=1e300, presence_penalty=2, frequency_penalty=-2, seed=5),
    ]
    jobs = [collect(engine, image, prompt, **fixed, **s) for s in settings]
    drive(engine)
    answers = [texts(events)[0] for _, events in jobs]
    assert all(isinstance(events[-1], Finished) for _, events in jobs)
    assert answers[:2] == [greedy, greedy]
    for s, answer in zip(settings, answers, strict=True):
        assert answer == vlm.generate(image, prompt, **fixed, **s)


def test_seeds_outside_64_bits_are_refused_and_the_largest_wraps(demo):
    """The seed 2**64 killed the engine thread and its request never got an answer. It is refused before
    it is queued; 2**64 - 1 with n=3 seeds its choices 2**64 - 1, 0 and 1 (torch takes no more)."""
    vlm, questions = demo
    with pytest.raises(ValueError, match=r"seed=18446744073709551616 is invalid"):
        SamplingParams(seed=2**64)
    engine = Engine(vlm, EngineConfig(slots=4))
    params = dict(max_new_tokens=6, min_length=6, do_sample=True, temperature=1.5)
    (_, events) = collect(engine, *questions[0], n=3, seed=2**64 - 1, **params)
    singles = [collect(engine, *questions[0], seed=seed, **params)[1] for seed in (2**64 - 1, 0, 1)]
    drive(engine)
    assert texts(events, 3) == [texts(s)[0] for s in singles]
    assert texts(singles[0])[0] == vlm.generate(*questions[0], seed=-1, **params)  # -1 is 2**64 - 1


@pytest.mark.parametrize("fault", ["seeding", "sampling", "detokenizing"])
def test_a_fault_in_one_requests_work_fails_it_alone(demo, monkeypatch, fault):
    """Whatever breaks in one request's own work (a bug: its input was checked) fails that request with a
    500; the requests decoding beside it, sampled or greedy, answer as they would alone."""
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=4))
    sampled = dict(max_new_tokens=6, min_length=6, do_sample=True, temperature=1.5)
    (victim, bad) = collect(engine, *questions[0], seed=666, **sampled)
    others = [(collect(engine, *questions[1], seed=7, **sampled), dict(seed=7, **sampled))]
    others += [(collect(engine, *questions[i], max_new_tokens=6), dict(max_new_tokens=6)) for i in (2, 3)]

    def victims(args) -> bool:  # the victim's request, or one of its sequences, or its settings
        return any(a is victim or getattr(a, "request", None) is victim or a is victim.params for a in args)

    def breaks_for_the_victim(method):
        def wrapped(*args):
            if victims(args):
                raise RuntimeError("injected")
            return method(*args)

        return wrapped

    if fault == "sampling":  # the sampler itself, as the engine calls it
        monkeypatch.setattr(engine_module, "next_tokens", breaks_for_the_victim(engine_module.next_tokens))
    else:
        name = {"seeding": "_generator", "detokenizing": "_advance_one"}[fault]
        monkeypatch.setattr(engine, name, breaks_for_the_victim(getattr(engine, name)))
    drive(engine)
    assert isinstance(bad[-1], Failed) and bad[-1].status == 500
    assert bad[-1].message == f"{fault} failed: RuntimeError: injected"
    assert victim.done and not engine._rows
    for ((_, events), params), i in zip(others, (1, 2, 3), strict=True):
        assert texts(events)[0] == vlm.generate(*questions[i], **params)


def test_the_supervisor_restarts_a_dead_engine_loop(demo):
    """A fault outside any request's work (injected into the loop itself) once stopped the engine thread
    for good: /health said 503 until a restart. The supervisor fails the requests the loop held (500),
    counts the restart and serves on."""
    vlm, questions = demo
    metrics = Metrics(2)
    engine = Engine(vlm, EngineConfig(slots=2), metrics=metrics).start()
    try:
        sink: queue.Queue = queue.Queue()
        engine.submit(
            Request(*questions[0], SamplingParams(max_new_tokens=10**6, min_length=10**6), sink.put)
        )
        assert isinstance(sink.get(timeout=30), Started)
        armed = threading.Event()
        real = engine._drop_ended

        def faulty():
            if armed.is_set():
                armed.clear()
                raise RuntimeError("injected")
            real()

        engine._drop_ended = faulty
        armed.set()
        last = sink.get(timeout=30)
        while not isinstance(last, Failed):
            last = sink.get(timeout=30)
        assert last.status == 500 and "restarted: RuntimeError: injected" in last.message
        assert engine.running and engine.restarts == 1 and isinstance(engine.error, RuntimeError)
        assert b"mambavl_engine_restarts_total 1.0" in metrics.render()
        assert engine.generate(*questions[1], max_new_tokens=6) == vlm.generate(
            *questions[1], max_new_tokens=6
        )
        assert engine.stats() == {"slots": 2, "active": 0, "prefilling": 0, "queued": 0}
    finally:
        engine.stop()


@pytest.mark.parametrize("preset", ["tiny-mlmamba", "tiny-viper-mamba"])
def test_length_checks_count_image_positions_exactly(preset):
    """A request's length is checked before it is queued, without running the tower: the positions
    counted for an image (AnyRes tiles, unpadding and row ends included) are those prefill embeds, so a
    prompt that fits exactly is taken and one position more is refused."""
    vlm = mambavl.create(preset)
    engine = Engine(vlm, EngineConfig(slots=1, cuda_graphs=False))
    for size in [(40, 30), (30, 90), (200, 20)]:
        image = vlm.preprocess(Image.new("RGB", size, (10, 200, 90)))
        positions = vlm.image_positions(image)
        assert positions == vlm.image_embeddings([image])[0].shape[0], size
        room = vlm.config.max_length - positions
        marker = "<image>" if vlm.config.image_placement == "placeholder" else ""
        fits = marker + "x" * room
        assert len(engine.encode(fits, image).ids) == room
        with pytest.raises(ValueError, match=f"the input is {vlm.config.max_length + 1} positions"):
            engine.encode(fits + "x", image)


def _stream_in_thread(engine, image, prompt, **params):
    """Runs a long answer in a thread; returns the thread and the arrival times of its deltas."""
    arrivals: list[float] = []

    def run():
        for event in engine.stream(image, prompt, **params):
            if isinstance(event, Delta):
                arrivals.append(time.monotonic())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(arrivals) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(arrivals) >= 3, "the long answer did not start"
    return thread, arrivals


def _tokens_decoded(engine) -> int:
    """Tokens generated so far by the live sequences (read from the engine thread's rows)."""
    return sum(len(s.ids) for s in list(engine._rows))


def test_an_oversized_prompt_is_refused_at_once_and_delays_nobody(demo):
    """A 15 MiB text was tokenized and embedded in the engine thread: 41–67 s to be refused, and every
    other stream waited. It is refused now in the caller's thread, unread, in well under a second, while a
    stream decodes on; a prompt under that bound but over the model's length is tokenized in the caller's
    thread too (the engine decoding meanwhile) and refused before it is queued."""
    vlm, questions = demo
    image, prompt = questions[0]
    engine = Engine(vlm, EngineConfig(slots=2)).start()
    try:
        before = engine.generate(*questions[1], max_new_tokens=8)
        thread, _ = _stream_in_thread(engine, image, prompt, max_new_tokens=10**6, min_length=10**6)
        decoded = _tokens_decoded(engine)
        started = time.monotonic()
        with pytest.raises(ValueError, match="refused unread; shorten the prompt"):
            engine.generate(None, "x" * (15 * 2**20), max_new_tokens=4)
        assert time.monotonic() - started < 1.0
        over = "x" * (vlm.config.max_length + 1)
        with pytest.raises(ValueError, match=f"takes at most {vlm.config.max_length}; shorten the prompt"):
            engine.generate(None, over, max_new_tokens=4)
        with pytest.raises(ValueError, match="not valid Unicode text: character 1"):
            engine.generate(None, "a\ud800b", max_new_tokens=4)
        # nothing was queued, and the stream decodes on (counted in tokens: whitespace text is held back;
        # the checks above take milliseconds, so its next tokens may come just after them)
        assert engine.stats()["queued"] == 0
        deadline = time.monotonic() + 10
        while _tokens_decoded(engine) <= decoded + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _tokens_decoded(engine) > decoded + 2
        assert engine.generate(*questions[1], max_new_tokens=8) == before
    finally:
        engine.stop()
    thread.join(timeout=30)


def test_tokenizing_a_long_prompt_lets_the_engine_decode(demo):
    """Tokenizing holds no lock the engine needs: while 2 MiB of text (admitted by a raised bound) is
    tokenized in this thread, a stream decoding in the engine thread keeps its pace."""
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=2, chars_per_token=2**12)).start()
    try:
        thread, arrivals = _stream_in_thread(engine, *questions[0], max_new_tokens=10**6, min_length=10**6)
        started = time.monotonic()
        with pytest.raises(ValueError, match="shorten the prompt"):
            engine.encode("x" * 2**21)
        took = time.monotonic() - started
        during = [t for t in arrivals if started <= t <= started + took]
        gaps = [b - a for a, b in zip([started, *during], [*during, started + took], strict=True)]
        assert max(gaps) < took / 2, (took, max(gaps), len(during))
    finally:
        engine.stop()
    thread.join(timeout=30)


def test_streams_go_on_while_a_long_prompt_is_prefilled(demo):
    """With a small prefill budget a long prompt is prefilled over many engine steps, a live stream gets a
    token at each of them, and both answers equal those of a quiet engine (`generate`)."""
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=4, prefill_tokens=8))
    image, prompt = questions[0]
    builder = vlm.get_prompt_builder()
    builder.add_turn("human", "Describe every detail of the picture, please. " * 4)
    long_prompt = builder.get_prompt()
    _, live_events = collect(engine, image, prompt, max_new_tokens=60, min_length=60)
    with torch.inference_mode():
        engine._admit()
        while not engine._rows:
            engine._admit()
        _, late_events = collect(engine, None, long_prompt, max_new_tokens=5)
        steps, tokens_meanwhile = 0, 0
        while not any(isinstance(e, Started) for e in late_events):
            before = len(live_events)
            engine._admit()
            engine._step_or_fail()
            tokens_meanwhile += len(live_events) > before
            steps += 1
    assert steps >= len(vlm.tokenizer.encode(long_prompt)) // 8
    assert tokens_meanwhile >= steps - 1  # every step but the last prefill's gave the live stream a token
    drive(engine)
    assert texts(live_events)[0] == vlm.generate(image, prompt, max_new_tokens=60, min_length=60)
    assert texts(late_events)[0] == vlm.generate(None, long_prompt, max_new_tokens=5)


def test_a_request_takes_its_slot_as_soon_as_its_own_prompt_is_in(demo):
    """Under a prefill budget the requests of one prefill job start one by one, as each prompt is in: the
    short first one streams while the job's longer prompts are still being prefilled (and the job is not
    counted against the slots twice), and every answer equals a quiet engine's."""
    vlm, questions = demo
    engine = Engine(vlm, EngineConfig(slots=4, prefill_batch=3, prefill_tokens=16))
    image, prompt = questions[0]
    builder = vlm.get_prompt_builder()
    builder.add_turn("human", "Describe every detail of the picture, please. " * 3)
    long_prompt = builder.get_prompt()
    asks = [(None, prompt, 12), (image, long_prompt, 4), (None, long_prompt, 4)]
    jobs = [collect(engine, im, p, max_new_tokens=k, min_length=k) for im, p, k in asks]
    first, last = jobs[0][1], jobs[2][1]
    with torch.inference_mode():
        engine._admit()
        assert len(engine._jobs) == 1 and len(engine._jobs[0].requests) == 3
        while not any(isinstance(e, Started) for e in first):
            engine._admit()
            if engine._rows:
                engine._step_or_fail()
        assert engine._jobs and len(engine._jobs[0].waiting) == 2 and len(engine._rows) == 1
        assert engine.stats()["prefilling"] == 2
        streamed = 0
        while not any(isinstance(e, Started) for e in last):
            before = len(first)
            engine._admit()
            if engine._rows:
                engine._step_or_fail()
            streamed += len(first) > before
    assert streamed >= 3  # the first answer went on while the job's other prompts were prefilled
    drive(engine)
    for (_, events), (im, p, k) in zip(jobs, asks, strict=True):
        assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
        assert texts(events)[0] == vlm.generate(im, p, max_new_tokens=k, min_length=k)
    assert not engine._jobs and not engine._rows


def test_every_surface_decodes_through_the_engine(demo, monkeypatch):
    """`generate` (batched too), `stream` and the chat session take their tokens from the one engine, and
    the stream's pieces join into generate's answer."""
    from mambavl.chat import ChatSession

    vlm, questions = demo
    steps = []
    real = Engine._step
    monkeypatch.setattr(Engine, "_step", lambda self: steps.append(len(self._rows)) or real(self))
    image, prompt = questions[0]
    one = vlm.generate(image, prompt, max_new_tokens=5)
    assert steps and max(steps) == 1
    steps.clear()
    batch = vlm.generate([image, None], [prompt, prompt], max_new_tokens=5)
    assert max(steps) == 2 and batch[0] == one
    steps.clear()
    assert "".join(vlm.stream(image, prompt, max_new_tokens=5)) == one and steps
    steps.clear()
    session = ChatSession(vlm, params=dict(max_new_tokens=5))
    session.image = image
    "".join(session.ask("What is in the image?"))
    assert steps
