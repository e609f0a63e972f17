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
from mambavl.serve.engine import Delta, Engine, EngineConfig, Failed, Finished, QueueFull, Request, Started
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
        assert engine.stats() == {"slots": 3, "active": 0, "queued": 0}
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
