"""The server under load: concurrent streaming clients over real HTTP, measured against the same requests
generated offline in one batch (`VLM.generate`, no server) in the same run.

`run_load` is the client side (also what the load tests use): each of `clients` concurrent clients sends
its share of the requests one after another, streamed, and every outcome is kept (status, text, time to
first token, latency, tokens, cached prompt tokens). `serve_bench` starts a server in this process and runs
the load from another process at several client counts. With `turns` > 1 each client holds conversations
of that many turns about one image (each turn sends the whole history, as chat clients do), once with the
prefix-state cache on and once with it off."""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import time
from base64 import b64encode
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx


@dataclass
class Outcome:
    status: int
    text: str = ""
    error: str = ""
    finish_reason: str | None = None
    tokens: int = 0  # completion tokens (the usage chunk)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt positions the server resumed from its prefix-state cache
    ttft: float = 0.0  # seconds to the first text (the first token may show none: then to the end)
    latency: float = 0.0  # seconds to the end of the stream
    gaps: list[float] = field(default_factory=list)  # seconds between one streamed text and the next

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.finish_reason is not None


def image_part(image) -> dict:
    """An OpenAI image part holding `image` (a PIL image) as a PNG data URI."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + b64encode(buf.getvalue()).decode()},
    }


def chat_body(question: str, image=None, **options) -> dict:
    content = [{"type": "text", "text": question}] + ([image_part(image)] if image is not None else [])
    body = {"messages": [{"role": "user", "content": content}], "stream": True}
    body["stream_options"] = {"include_usage": True}
    return body | options


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, headers: dict | None = None) -> Outcome:
    start = time.perf_counter()
    out = Outcome(status=0)
    last = 0.0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = (await r.aread()).decode(errors="replace")
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = chunk["error"]["message"]
                    continue
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    out.tokens = usage["completion_tokens"]
                    out.prompt_tokens = usage.get("prompt_tokens", 0)
                    out.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content")
                    if piece or choice.get("finish_reason"):  # the first text (or the end, if none)
                        now = time.perf_counter() - start
                        if out.ttft:
                            out.gaps.append(now - last)
                        out.ttft, last = out.ttft or now, now
                    out.text += piece or ""
                    if choice.get("finish_reason"):
                        out.finish_reason = choice["finish_reason"]
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    finally:
        out.latency = time.perf_counter() - start
    return out


async def _load(url: str, bodies: list[dict], clients: int, headers: dict | None) -> list[Outcome]:
    outcomes: list[Outcome | None] = [None] * len(bodies)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def client_loop(k: int) -> None:
            for i in range(k, len(bodies), clients):  # client k sends requests k, k + clients, ...
                outcomes[i] = await stream_one(client, url, bodies[i], headers)

        await asyncio.gather(*(client_loop(k) for k in range(clients)))
    return outcomes  # type: ignore[return-value]


def run_load(
    url: str, bodies: list[dict], clients: int, api_key: str | None = None
) -> tuple[list[Outcome], float]:
    """Sends `bodies` from `clients` concurrent streaming clients; returns the outcomes (in the order of
    `bodies`) and the wall time."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    start = time.perf_counter()
    outcomes = asyncio.run(_load(url, bodies, clients, headers))
    return outcomes, time.perf_counter() - start


async def _conversations(url: str, talks: list[tuple[dict, list[str]]], clients: int) -> list[list[Outcome]]:
    out: list[list[Outcome]] = [[] for _ in talks]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def client_loop(k: int) -> None:
            for i in range(k, len(talks), clients):
                first, questions = talks[i]
                messages: list[dict] = []
                for t, question in enumerate(questions):
                    body = chat_body(question, first["image"] if t == 0 else None, **first["options"])
                    body["messages"] = messages + body["messages"]
                    outcome = await stream_one(client, url, body)
                    out[i].append(outcome)
                    if not outcome.ok:
                        break
                    messages = body["messages"] + [{"role": "assistant", "content": outcome.text}]

        await asyncio.gather(*(client_loop(k) for k in range(clients)))
    return out


def run_conversations(
    url: str, talks: list[tuple[dict, list[str]]], clients: int
) -> tuple[list[list[Outcome]], float]:
    """Each of `clients` concurrent clients holds its share of the conversations one after another: talk i
    is ({"image": PIL image, "options": request options}, [question per turn]); every turn sends the
    history so far. Returns each conversation's outcomes by turn, and the wall time."""
    start = time.perf_counter()
    outcomes = asyncio.run(_conversations(url, talks, clients))
    return outcomes, time.perf_counter() - start


def _apart(fn, *args):
    """`fn(*args)` in a process of its own, as real clients are: the clients' JSON and SSE parsing then
    does not compete with the server for this process's interpreter lock."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run_load_apart(url: str, bodies: list[dict], clients: int) -> tuple[list[Outcome], float]:
    """`run_load` from a process of its own."""
    return _apart(run_load, url, bodies, clients)


def run_conversations_apart(
    url: str, talks: list[tuple[dict, list[str]]], clients: int
) -> tuple[list[list[Outcome]], float]:
    """`run_conversations` from a process of its own."""
    return _apart(run_conversations, url, talks, clients)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def summarize(outcomes: list[Outcome], wall: float, clients: int) -> dict:
    good = [o for o in outcomes if o.ok]
    tokens = sum(o.tokens for o in good)
    latency = [o.latency for o in good]
    ttft = [o.ttft for o in good if o.ttft]
    gaps = [g for o in good for g in o.gaps]
    return {
        "clients": clients,
        "requests": len(outcomes),
        "failures": len(outcomes) - len(good),
        "wall_s": wall,
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_mean_s": sum(ttft) / len(ttft) if ttft else 0.0,
        # between two streamed texts of one request: a decode step, or longer where prefills came between
        "gap_p50_s": percentile(gaps, 50),
        "gap_p99_s": percentile(gaps, 99),
        "completion_tokens": tokens,
        # prompt positions resumed from the prefix-state cache rather than prefilled (of all the prompts')
        "cached_tokens": sum(o.cached_tokens for o in good),
        "prompt_tokens": sum(o.prompt_tokens for o in good),
        "tokens_per_s": tokens / wall if wall else 0.0,
        "requests_per_s": len(good) / wall if wall else 0.0,
    }


def rss_bytes() -> int:
    """This process's resident memory (Linux), or 0 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class ServeBenchConfig:
    clients: tuple[int, ...] = (1, 8, 64)
    requests_per_client: int = 2
    max_tokens: int = 128  # every request generates exactly this many tokens (ignore_eos)
    slots: int = 64
    image_size: int = 384
    question: str = "Describe the image in detail."
    temperature: float = 0.0  # 0: greedy; > 0: every request samples at it (unseeded), and so does the peer
    peer: bool = True  # the same requests through `VLM.generate` in one batch, no server
    turns: int = 1  # > 1: conversations of this many turns, the prefix-state cache on and then off
    # the engine's prefill budgets to serve with, one after another (positions per engine step; 0: each
    # admitted batch at once); empty: the engine's default
    prefill_tokens: tuple[int, ...] = ()
    prefill_batch: int | None = None  # waiting requests the engine prefills together (None: its default)
    # after the measured runs, the largest load once more under the PyTorch profiler (`serve_profile.txt`)
    profile: bool = False
    # CPU threads torch's operators use while the bench runs (server and offline batch alike); 0: torch's
    # default. The process's setting is restored afterwards.
    torch_threads: int = 0

    def __post_init__(self):
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature={self.temperature}: 0 (greedy) up to 2, as the API takes it")
        if self.turns < 1:
            raise ValueError(f"turns={self.turns}: a conversation has at least one turn")
        if any(t < 0 for t in self.prefill_tokens):
            raise ValueError(f"prefill_tokens={self.prefill_tokens}: budgets are ≥ 0 (0: no budget)")
        if self.prefill_batch is not None and self.prefill_batch < 1:
            raise ValueError(f"prefill_batch={self.prefill_batch}: at least one request a batch")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads={self.torch_threads}: threads ≥ 1, or 0 for torch's default")

    def engine_configs(self, **options) -> list:
        """One engine configuration per prefill budget to measure."""
        from mambavl.engine.scheduler import EngineConfig

        if self.prefill_batch is not None:
            options = {"prefill_batch": self.prefill_batch} | options
        if not self.prefill_tokens:
            return [EngineConfig(slots=self.slots, **options)]
        return [
            EngineConfig(slots=self.slots, prefill_tokens=t or None, **options) for t in self.prefill_tokens
        ]


def synthetic_image(size: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def serve_bench(vlm, cfg: ServeBenchConfig, out: Path | None = None, say=print) -> dict:
    """The server at each client count, and the offline batch peer, on the same requests (with
    `cfg.torch_threads` CPU threads for torch's operators where it is set)."""
    import torch

    before = torch.get_num_threads()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    try:
        return _serve_bench(vlm, cfg, out, say)
    finally:
        torch.set_num_threads(before)


def _serve_bench(vlm, cfg: ServeBenchConfig, out: Path | None, say) -> dict:
    from mambavl.serve import Engine, ServeConfig
    from mambavl.serve.thread import ServerThread

    if cfg.turns > 1:
        return _write(_conversation_bench(vlm, cfg, say), vlm, cfg, out)
    rows, offline, loads = [], {}, {}
    for clients in cfg.clients:  # the same requests for every budget, encoded once
        loads[clients] = _requests(cfg, clients * cfg.requests_per_client, clients * 10**6)
    for k, engine_config in enumerate(cfg.engine_configs()):
        with ServerThread(Engine(vlm, engine_config), ServeConfig(model_name=vlm.config.name)) as url:
            for clients in cfg.clients:
                images, bodies = loads[clients]
                # warm-up (towers, graphs, allocator) with requests of their own: none of the measured
                # ones may find its image or prompt in the prefix-state cache
                run_load(url, _requests(cfg, clients, clients * 10**6 + 500_000)[1], clients)
                before = engine_seconds(url)
                outcomes, wall = run_load_apart(url, bodies, clients)
                row = summarize(outcomes, wall, clients) | {
                    "prefill_tokens": engine_config.prefill_tokens,
                    "prefill_batch": engine_config.prefill_batch,
                }
                after = engine_seconds(url)
                row |= {k: after[k] - before[k] for k in after}  # where the engine's time went
                # the engine's own TTFT (from a request's submission to the engine): what the client's
                # mean adds to it was spent before (reading the body, the image, tokenizing) or after
                # (streaming the text out)
                total, count = row.pop("server_ttft_sum_s"), row.pop("server_ttft_count")
                row["server_ttft_mean_s"] = total / count if count else 0.0
                if cfg.peer:
                    if clients not in offline:
                        offline[clients] = _offline(vlm, images[:clients], cfg)
                    row["peer_offline_tokens_per_s"] = offline[clients]
                rows.append(row)
                say(_line(row))
            if cfg.profile and k == 0:  # the last load measured, with the first engine configuration
                clients = cfg.clients[-1]
                fresh = _requests(cfg, clients * cfg.requests_per_client, clients * 10**6 + 700_000)
                rows[-1]["profile"] = profile_load(url, fresh[1], clients, out)
                say(_profile_line(rows[-1]["profile"]))
    return _write(rows, vlm, cfg, out)


RANGES = ("engine.", "prefill.")  # the profiler ranges of the engine's phases and the prefill's parts


def profile_load(url: str, bodies: list[dict], clients: int, out: Path | None = None) -> dict:
    """Sends the load once more while the PyTorch profiler records this process (the server: its engine
    thread's phases and ops, every thread's) and the GPU. Returns where the engine thread's time went
    (`RANGES`: seconds on the thread, and the GPU's span of the work each queued), the GPU's kernel
    seconds by category against the wall, and the operators with the most CPU time of their own (every
    thread's); with `out`, the profiler's tables in `serve_profile.txt`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mambavl.bench.ours import kernel_category

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:  # the engine runs in a thread of its own, which a profiler sees only when asked to
        from torch._C._profiler import _ExperimentalConfig

        options = {"experimental_config": _ExperimentalConfig(profile_all_threads=True)}
    except (ImportError, TypeError):
        options = {}
    with profile(activities=activities, **options) as prof:
        outcomes, wall = run_load_apart(url, bodies, clients)
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    # each range shows twice: on its thread (CPU seconds from entry to exit) and, where it queued GPU work,
    # as the GPU's span from its first kernel to its last (CUDA graph replays included)
    ranges: dict[str, dict] = {}
    for e in averages:
        if e.key.startswith(RANGES):
            entry = ranges.setdefault(e.key, {"count": 0, "thread_s": 0.0, "gpu_span_s": 0.0})
            if e.device_type.name == "CPU":
                entry["count"], entry["thread_s"] = e.count, e.cpu_time_total / 1e6
            else:
                entry["gpu_span_s"] = e.device_time_total / 1e6
    kernels: dict[str, float] = {}
    for event in prof.events():
        seconds = (getattr(event, "device_time", 0.0) or 0.0) / 1e6
        if event.device_type.name == "CUDA" and seconds > 0 and not event.name.startswith(RANGES):
            category = kernel_category(event.name)
            kernels[category] = kernels.get(category, 0.0) + seconds
    busiest = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:15]
    result = {
        "clients": clients,
        "requests": len(outcomes),
        "failures": sum(not o.ok for o in outcomes),
        "wall_s": wall,
        "ranges": dict(sorted(ranges.items())),
        "kernel_s": sum(kernels.values()),
        "kernel_s_by_category": dict(sorted(kernels.items(), key=lambda kv: -kv[1])),
        "self_cpu_s_by_op": {e.key: e.self_cpu_time_total / 1e6 for e in busiest},
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        tables = [averages.table(sort_by="self_cpu_time_total", row_limit=40)]
        if cuda:
            tables.append(averages.table(sort_by="self_device_time_total", row_limit=40))
        (out / "serve_profile.txt").write_text("\n\n".join(tables))
    return result


def _profile_line(profiled: dict) -> str:
    ranges = ", ".join(
        f"{name} {r['thread_s']:.2f} s ({r['count']}×, GPU span {r['gpu_span_s']:.2f} s)"
        for name, r in profiled["ranges"].items()
    )
    return (
        f"profile, {profiled['clients']} clients: wall {profiled['wall_s']:.2f} s, GPU kernels "
        f"{profiled['kernel_s']:.2f} s; {ranges}"
    )


def _requests(cfg: ServeBenchConfig, n: int, seed: int) -> tuple[list, list[dict]]:
    """`n` requests of images and questions numbered from `seed`: (images, request bodies)."""
    images = [synthetic_image(cfg.image_size, seed + i) for i in range(n)]
    options = dict(max_tokens=cfg.max_tokens, ignore_eos=True, temperature=cfg.temperature)
    return images, [chat_body(f"{cfg.question} ({seed + i})", im, **options) for i, im in enumerate(images)]


def _write(rows: list[dict], vlm, cfg: ServeBenchConfig, out: Path | None) -> dict:
    result = {
        "model": vlm.config.name,
        "device": str(vlm.device),
        "dtype": str(vlm.dtype),
        "config": asdict(cfg),
        "results": rows,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve.json").write_text(json.dumps(result, indent=2))
    return result


FOLLOW_UPS = ("What colours stand out?", "Is there any text in it?", "Summarise that in one sentence.")


def _conversation_bench(vlm, cfg: ServeBenchConfig, say) -> list[dict]:
    """Conversations of `cfg.turns` turns per client count, with the prefix-state cache on, then off."""
    from mambavl.serve import Engine, ServeConfig
    from mambavl.serve.thread import ServerThread

    options = dict(max_tokens=cfg.max_tokens, ignore_eos=True, temperature=cfg.temperature)
    questions = [cfg.question] + [FOLLOW_UPS[t % len(FOLLOW_UPS)] for t in range(cfg.turns - 1)]
    rows = []
    for cache in (True, False):
        engine = Engine(vlm, cfg.engine_configs(prefix_cache_gb=4.0 if cache else 0.0)[0])
        with ServerThread(engine, ServeConfig(model_name=vlm.config.name)) as url:
            warm = [({"image": synthetic_image(cfg.image_size, 10**6), "options": options}, questions[:2])]
            run_conversations(url, warm, 1)  # warm-up: towers, graphs, allocator
            for clients in cfg.clients:
                n = clients * cfg.requests_per_client
                talks = [
                    (
                        {"image": synthetic_image(cfg.image_size, 1000 * clients + i), "options": options},
                        questions,
                    )
                    for i in range(n)  # images of their own at each client count: no hit from an earlier one
                ]
                outcomes, wall = run_conversations_apart(url, talks, clients)
                row = _turn_summary(outcomes, wall, clients) | {"prefix_cache": cache}
                rows.append(row)
                say(_turn_line(row))
    return rows


def _turn_summary(outcomes: list[list[Outcome]], wall: float, clients: int) -> dict:
    flat = [o for talk in outcomes for o in talk]
    row = summarize(flat, wall, clients) | {"turns": []}
    for t in range(max(len(talk) for talk in outcomes)):
        here = [talk[t] for talk in outcomes if len(talk) > t and talk[t].ok]
        row["turns"].append(
            {
                "turn": t + 1,
                "requests": len(here),
                "ttft_p50_s": percentile([o.ttft for o in here], 50),
                "ttft_p99_s": percentile([o.ttft for o in here], 99),
                "prompt_tokens_mean": statistics.fmean(o.prompt_tokens for o in here) if here else 0.0,
                "cached_tokens_mean": statistics.fmean(o.cached_tokens for o in here) if here else 0.0,
            }
        )
    return row


def _turn_line(row: dict) -> str:
    turns = "; ".join(
        f"turn {t['turn']}: TTFT p50 {t['ttft_p50_s'] * 1e3:.0f} ms, "
        f"{t['cached_tokens_mean']:.0f}/{t['prompt_tokens_mean']:.0f} prompt tokens cached"
        for t in row["turns"]
    )
    cache = "on" if row["prefix_cache"] else "off"
    return (
        f"{row['clients']:>3} clients, cache {cache}: {row['failures']} failed, "
        f"{row['tokens_per_s']:,.0f} tok/s; {turns}"
    )


def engine_seconds(url: str) -> dict:
    """Running totals from the server's /metrics: the engine's time in prefill work and in decode steps,
    decode steps taken and the sequences they carried, the sum and count of the engine's times to first
    token, and the engine thread's time by phase (`engine_<phase>_s`, see
    `mambavl.engine.scheduler.PHASES`)."""
    from prometheus_client.parser import text_string_to_metric_families

    from mambavl.engine.scheduler import PHASES

    wanted = {
        "mambavl_prefill_work_seconds_sum": "prefill_s",
        "mambavl_decode_step_seconds_sum": "decode_s",
        "mambavl_decode_step_seconds_count": "decode_steps",
        "mambavl_decode_batch_size_sum": "decoded_rows",
        "mambavl_time_to_first_token_seconds_sum": "server_ttft_sum_s",
        "mambavl_time_to_first_token_seconds_count": "server_ttft_count",
    }
    totals = dict.fromkeys(wanted.values(), 0.0) | {f"engine_{phase}_s": 0.0 for phase in PHASES}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in wanted:
                totals[wanted[sample.name]] += sample.value
            elif sample.name == "mambavl_engine_seconds_total":
                totals[f"engine_{sample.labels['phase']}_s"] += sample.value
    return totals


def _offline(vlm, images: list, cfg: ServeBenchConfig) -> float:
    """tok/s of `VLM.generate` on one batch of the same requests (`len(images)` rows at once)."""
    import torch

    builder = vlm.get_prompt_builder()
    builder.add_turn("human", cfg.question)
    prompts = [builder.get_prompt()] * len(images)
    kwargs = dict(max_new_tokens=cfg.max_tokens, min_length=cfg.max_tokens)
    if cfg.temperature > 0:
        kwargs |= dict(do_sample=True, temperature=cfg.temperature)
    vlm.generate(images, prompts, max_new_tokens=2)  # warm-up
    if vlm.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    vlm.generate(images, prompts, **kwargs)
    if vlm.device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) * cfg.max_tokens / (time.perf_counter() - start)


def _server_ttft(row: dict) -> str:
    return f" (in the engine {row['server_ttft_mean_s'] * 1e3:.0f} ms)" if "server_ttft_mean_s" in row else ""


def _line(row: dict) -> str:
    budget, batch = row.get("prefill_tokens", "default"), row.get("prefill_batch", "default")
    text = (
        f"{row['clients']:>3} clients (prefill budget {budget}, batch {batch}): {row['requests']} requests, "
        f"{row['failures']} failed, "
        f"latency p50 {row['latency_p50_s'] * 1e3:.0f} ms p99 {row['latency_p99_s'] * 1e3:.0f} ms, "
        f"TTFT p50 {row['ttft_p50_s'] * 1e3:.0f} ms p99 {row['ttft_p99_s'] * 1e3:.0f} ms "
        f"mean {row['ttft_mean_s'] * 1e3:.0f} ms{_server_ttft(row)}, "
        f"gap p50 {row['gap_p50_s'] * 1e3:.1f} ms p99 {row['gap_p99_s'] * 1e3:.1f} ms, "
        f"{row['tokens_per_s']:,.0f} tok/s"
    )
    if row.get("cached_tokens"):
        text += f", {row['cached_tokens'] / row['prompt_tokens']:.0%} of the prompts' positions cached"
    if row.get("decode_steps"):
        text += (
            f"; engine: prefill {row['prefill_s']:.2f} s, {row['decode_steps']:.0f} steps in "
            f"{row['decode_s']:.2f} s, {row['decoded_rows'] / row['decode_steps']:.1f} rows a step"
        )
    phases = [(k[len("engine_") : -2], v) for k, v in row.items() if k.startswith("engine_") and v > 0]
    if phases:
        text += "; engine thread: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases)
    if "peer_offline_tokens_per_s" in row:
        text += f" (offline batch: {row['peer_offline_tokens_per_s']:,.0f} tok/s)"
    return text
