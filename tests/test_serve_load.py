"""Load and faults: 64 concurrent streaming clients against the demo model, with clients that leave
mid-stream and malformed requests mixed in. No good request fails, every answer equals the same request
served alone, the slots all come free, and the process's memory stays flat."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from PIL import Image

import mambavl
from mambavl.bench.serve import chat_body, rss_bytes, run_conversations, run_load, summarize
from mambavl.serve import EngineConfig
from serving import LiveServer

CLIENTS = 64


@pytest.fixture(scope="module")
def bodies(demo_model_dir):
    data = demo_model_dir.parent / "data"
    rows = json.loads((data / "heldout.json").read_text())
    out = []
    for i, row in enumerate(rows[: 2 * CLIENTS]):
        image = Image.open(data / "images" / row["image"]).convert("RGB")
        question = row["conversations"][0]["value"].replace("<image>", "").strip()
        # greedy answers of different lengths: some stop at the end of text, some run to max_tokens
        out.append(chat_body(question, image, max_tokens=4 + i % 13, temperature=0, min_tokens=i % 5))
    return out


async def leave_early(url: str, body: dict, chunks: int) -> None:
    """A client that reads a few chunks of a long answer and hangs up."""
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        seen = 0
        async for line in r.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= chunks:
                return


async def garbage(url: str, k: int) -> int:
    payloads = [
        b'{"messages": [',
        b'{"messages": 7}',
        json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"},
                            }
                        ],
                    }
                ]
            }
        ).encode(),
        b"x" * (17 * 2**20),
    ]
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(
            url + "/v1/chat/completions",
            content=payloads[k % len(payloads)],
            headers={"content-type": "application/json"},
        )
        return r.status_code


def _conversations(demo_model_dir) -> list:
    """Eight three-turn conversations about held-out images (each turn sends the history)."""
    data = demo_model_dir.parent / "data"
    rows = json.loads((data / "heldout.json").read_text())[-8:]
    follow_ups = ["What colour are the objects?", "How many objects are there?"]
    talks = []
    for row in rows:
        image = Image.open(data / "images" / row["image"]).convert("RGB")
        question = row["conversations"][0]["value"].replace("<image>", "").strip()
        talks.append(
            ({"image": image, "options": {"max_tokens": 6, "temperature": 0}}, [question, *follow_ups])
        )
    return talks


def test_64_streaming_clients_with_faults(demo_model_dir, bodies):
    """64 single-request clients, 8 clients holding three-turn conversations (later turns resume from the
    prefix-state cache while the others load the engine), 8 that hang up mid-stream and 8 that send
    garbage: every good answer equals the same request (or conversation) served alone."""
    vlm = mambavl.load(demo_model_dir)
    talks = _conversations(demo_model_dir)
    with LiveServer(vlm, EngineConfig(slots=16)) as url:
        alone, _ = run_load(url, bodies, 1)  # each request served alone, one after another
        assert all(o.ok for o in alone), [o.error for o in alone if not o.ok]
        talks_alone, _ = run_conversations(url, talks, 1)
        assert all(len(t) == 3 and all(o.ok for o in t) for t in talks_alone)
        rss_before = rss_bytes()

        async def mixed():
            long = chat_body("What colour are the objects?", None, max_tokens=2000, ignore_eos=True)
            leavers = [leave_early(url, long, 3 + k) for k in range(8)]
            bad = [garbage(url, k) for k in range(8)]
            return await asyncio.gather(
                asyncio.to_thread(run_load, url, bodies, CLIENTS),
                asyncio.to_thread(run_conversations, url, talks, len(talks)),
                *leavers,
                *bad,
            )

        (outcomes, wall), (talks_mixed, _), *rest = asyncio.run(mixed())
        assert [[o.text for o in t] for t in talks_mixed] == [[o.text for o in t] for t in talks_alone]
        # turns 2 and 3 resumed at least the whole previous prompt (the first turns were served before)
        for t in talks_mixed:
            assert t[1].cached_tokens >= t[0].prompt_tokens and t[2].cached_tokens >= t[1].prompt_tokens
        statuses = rest[8:]
        assert sorted(statuses) == [400] * 6 + [413] * 2
        failures = [o for o in outcomes if not o.ok]
        assert not failures, failures[:3]
        assert [o.text for o in outcomes] == [o.text for o in alone]
        assert [o.finish_reason for o in outcomes] == [o.finish_reason for o in alone]
        # everyone left: no slot stays taken, nothing waits
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").json()["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(url + "/health").json() | {"status": "ok"} == {
            "status": "ok",
            "model": "test-model",
            "slots": 16,
            "active": 0,
            "prefilling": 0,
            "queued": 0,
        }
        metrics = httpx.get(url + "/metrics").text
        assert 'mambavl_requests_total{outcome="cancelled"} 8.0' in metrics
        # memory stays flat: states live in fixed slots, nothing grows with the number of requests
        assert rss_bytes() - rss_before < 256 * 2**20
        stats = summarize(outcomes, wall, CLIENTS)
        assert stats["requests"] == len(bodies) and stats["failures"] == 0
        print(json.dumps(stats))


def test_conversation_bench_resumes_later_turns_from_the_cache():
    """`bench --serve --turns 3` on the CPU: every turn answers; with the cache on, turns 2 and 3 resume at
    least the whole previous prompt (cached_tokens in the usage), with it off nothing is cached."""
    import itertools

    from mambavl.bench.serve import ServeBenchConfig, serve_bench
    from serving import printable_tiny_cobra

    vlm = printable_tiny_cobra()
    cfg = ServeBenchConfig(clients=(1, 2), requests_per_client=1, max_tokens=4, slots=4, image_size=64,
                           peer=False, turns=3)  # fmt: skip
    rows = serve_bench(vlm, cfg, say=lambda _: None)["results"]
    assert [(r["clients"], r["prefix_cache"]) for r in rows] == [(1, True), (2, True), (1, False), (2, False)]
    for row in rows:
        assert row["failures"] == 0 and [t["turn"] for t in row["turns"]] == [1, 2, 3]
        turns = row["turns"]
        assert turns[0]["cached_tokens_mean"] == 0
        for before, now in itertools.pairwise(turns):
            if row["prefix_cache"]:
                assert now["cached_tokens_mean"] >= before["prompt_tokens_mean"]
            else:
                assert now["cached_tokens_mean"] == 0


def test_serve_bench_measures_each_prefill_budget_and_the_gaps_between_tokens():
    """`bench --serve --prefill-tokens 0,64` on the CPU: one row per (budget, client count), each with every
    request answered in full, its TTFT (the clients' and the engine's own) and its gaps between streamed
    tokens (one per token after the first text), and the offline peer measured once per client count."""
    from mambavl.bench.serve import ServeBenchConfig, serve_bench
    from serving import printable_tiny_cobra

    vlm = printable_tiny_cobra()
    cfg = ServeBenchConfig(clients=(1, 3), requests_per_client=1, max_tokens=5, slots=4, image_size=64,
                           prefill_tokens=(0, 64))  # fmt: skip
    rows = serve_bench(vlm, cfg, say=lambda _: None)["results"]
    assert [(r["prefill_tokens"], r["clients"]) for r in rows] == [(None, 1), (None, 3), (64, 1), (64, 3)]
    for row in rows:
        assert row["failures"] == 0 and row["completion_tokens"] == 5 * row["clients"]
        assert 0 < row["ttft_p50_s"] <= row["latency_p99_s"]
        # the engine's own TTFT (submission to the first token) is part of what each client waited
        assert 0 < row["server_ttft_mean_s"] <= row["ttft_mean_s"] <= row["latency_p99_s"]
        assert 0 < row["gap_p50_s"] <= row["gap_p99_s"] < row["latency_p99_s"]
        assert row["peer_offline_tokens_per_s"] > 0
        # every measured request is new to the server (the warm-up sends others): all of it is prefilled
        assert row["cached_tokens"] == 0 and row["prompt_tokens"] > 0
        # the engine thread's time by phase: each phase that had work took some, and together no more
        # than the load's wall time
        phases = {k: v for k, v in row.items() if k.startswith("engine_")}
        assert all(phases[f"engine_{p}_s"] > 0 for p in ("open", "prefill", "start", "step", "advance"))
        assert sum(v for k, v in phases.items() if k != "engine_wait_s") <= row["wall_s"]
    # the peer does not depend on the server's budget: measured once, reported in both rows
    assert rows[0]["peer_offline_tokens_per_s"] == rows[2]["peer_offline_tokens_per_s"]


def test_serve_bench_runs_on_the_torch_threads_it_is_given_and_gives_them_back():
    """`bench --serve --torch-threads 1`: the run (server and its messages) sees one intra-op thread, the
    setting is in serve.json's config, and the process's own count comes back afterwards."""
    import torch

    from mambavl.bench.serve import ServeBenchConfig, serve_bench
    from serving import printable_tiny_cobra

    vlm = printable_tiny_cobra()
    before = torch.get_num_threads()
    seen = []
    cfg = ServeBenchConfig(clients=(1,), requests_per_client=1, max_tokens=3, slots=2, image_size=64,
                           peer=False, torch_threads=1)  # fmt: skip
    result = serve_bench(vlm, cfg, say=lambda _: seen.append(torch.get_num_threads()))
    assert result["config"]["torch_threads"] == 1 and result["results"][0]["failures"] == 0
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="torch_threads"):
        ServeBenchConfig(torch_threads=-1)


def test_serve_bench_refuses_a_negative_budget():
    from mambavl.bench.serve import ServeBenchConfig

    with pytest.raises(ValueError, match="budgets are ≥ 0"):
        ServeBenchConfig(prefill_tokens=(-1,))


def test_serve_bench_profiles_the_engine_thread(tmp_path):
    """`bench --serve --profile` on the CPU: the last load runs once more under the profiler, which sees the
    engine's own thread: its phases and the prefill's parts show as ranges with their counts, each no
    longer than the load's wall, and the tables are written."""
    from mambavl.bench.serve import ServeBenchConfig, serve_bench
    from serving import printable_tiny_cobra

    vlm = printable_tiny_cobra()
    cfg = ServeBenchConfig(clients=(2,), requests_per_client=2, max_tokens=4, slots=4, image_size=64,
                           peer=False, profile=True)  # fmt: skip
    (row,) = serve_bench(vlm, cfg, tmp_path, say=lambda _: None)["results"]
    profiled = row["profile"]
    assert profiled["requests"] == 4 and profiled["failures"] == 0
    ranges = profiled["ranges"]
    engine = ("engine.open", "engine.prefill", "engine.start", "engine.step", "engine.advance")
    prefill = ("prefill.lookup", "prefill.towers", "prefill.rows", "prefill.lm", "prefill.snapshot")
    for name in engine + prefill:
        assert ranges[name]["count"] >= 1, name
        assert 0 < ranges[name]["thread_s"] <= profiled["wall_s"], name
    # each request is opened once (alone or in a batch) and takes 4 tokens: at least 3 decode steps
    assert ranges["engine.step"]["count"] >= 3
    assert "engine.open" in (tmp_path / "serve_profile.txt").read_text()


def test_serve_bench_samples_at_a_temperature():
    """`bench --serve --temperature 1`: every request samples (unseeded rows batched in the engine) and is
    answered in full, beside an offline batch that samples too; temperatures the API refuses are refused
    before anything runs."""
    import pytest

    from mambavl.bench.serve import ServeBenchConfig, serve_bench
    from serving import printable_tiny_cobra

    vlm = printable_tiny_cobra()
    cfg = ServeBenchConfig(clients=(3,), requests_per_client=2, max_tokens=6, slots=4, image_size=64,
                           temperature=1.0, profile=False)  # fmt: skip
    (row,) = serve_bench(vlm, cfg, say=lambda _: None)["results"]
    assert row["failures"] == 0 and row["completion_tokens"] == 6 * 6
    assert row["peer_offline_tokens_per_s"] > 0
    with pytest.raises(ValueError, match=r"temperature=2\.5"):
        ServeBenchConfig(temperature=2.5)
