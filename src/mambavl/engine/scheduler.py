"""The engine: a fixed number of state slots shared by every request (continuous batching). Every surface
decodes through it: the server (its thread, `start` / `submit`), and `VLM.generate` / `stream`, the chat
CLI and the evaluations (in the caller's thread, `steps`), so that end of text, stop strings, min_length,
sampling and batching have one implementation.

A request's prompt is prefilled (`engine.prefill`: from the longest prefix the prefix-state cache holds,
at most `prefill_tokens` positions per engine step beside one decode step of the live sequences), and its
state is copied into one free slot per choice; then every step decodes one token for all live sequences
at once. A sequence that ends, is cancelled or runs out of time leaves at once, and its slot goes to the
next request in the queue: requests join and leave the running batch at token granularity. A Mamba
sequence's state has a fixed size, so the memory of `slots` sequences is allocated once, whatever their
lengths.

In a server the engine runs in one background thread; callers talk to it through `submit` / `cancel` and
receive events (`Started`, `Delta`, `Finished`, `Failed`) through the request's `sink`, called from that
thread.
Whatever a request carries fails that request alone: its prompt is measured and tokenized in the
caller's thread (`encode`) before it is queued, every step of its own work in the engine thread is
guarded, and a supervisor restarts the loop (failing only the requests it held) if it dies anyway.
"""

from __future__ import annotations

import itertools
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch.profiler import record_function

from mambavl.engine.prefill import Prefilled, PrefillJob
from mambavl.engine.prefix_cache import CacheStats, PrefixCache, Snapshot
from mambavl.lm.state import LMState
from mambavl.runtime import to_device
from mambavl.vision.images import ImageError
from mambavl.vlm.graphs import BUCKETS, GraphDecoder, KVGraphDecoder, slot_decoder
from mambavl.vlm.model import VLM, PreparedImage, PromptIds
from mambavl.vlm.sampling import SamplingParams, greedy_tokens, next_tokens, seeded_generator
from mambavl.vlm.tokenizer import StreamDecoder

log = logging.getLogger(__name__)
# the cache length up to which the engine captures its attention models' graphs before serving
WARM_CACHE = 2048


# Where the engine thread's time goes (`Engine.phase_seconds`): opening prefill batches (cache lookups,
# towers), their LM positions, loading them into slots, decode steps, the host work after each step, waiting.
PHASES = ("open", "prefill", "start", "step", "advance", "wait")


@dataclass(frozen=True)
class EngineConfig:
    slots: int = 64  # sequences decoded together; each holds one fixed-size recurrent state
    max_queue: int = 1024  # requests waiting for a slot before new ones are refused
    prefill_batch: int = 16  # waiting requests prefilled together in one batch
    # Prompt positions prefilled per engine step, beside one decode step of the live sequences: a long
    # prompt or a batch of images is prefilled over several steps while the streams go on. None (the
    # default): each admitted batch at once, the streams waiting meanwhile; under a burst of image
    # requests that gives more tokens/s and earlier first tokens, a budget smaller pauses in the streams
    # (BENCHMARKS.md, the server tables).
    prefill_tokens: int | None = None
    timeout: float | None = 600.0  # seconds from submission to the last token (None: no limit)
    cuda_graphs: bool = True  # decode through CUDA graphs where the model allows it
    # The interpreter's thread switch interval while the engine runs (Python's default is 5 ms): after
    # each GPU step the engine thread waits up to this long for the lock that the HTTP threads hold.
    switch_interval: float | None = 0.0005
    # A prompt's text is refused unread beyond the model's max_length × this many characters: tokenizing
    # costs time in proportion to the text, and no tokenizer packs this many characters into each token.
    chars_per_token: int = 32
    # The exact prefix-state cache (engine.prefix_cache): GiB of snapshots on the model's device, and
    # optionally in host memory for those evicted from it; 0 and 0 turn it off.
    prefix_cache_gb: float = 4.0
    prefix_cache_host_gb: float = 0.0

    def __post_init__(self):
        for name in ("slots", "max_queue", "prefill_batch", "chars_per_token"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: it must be ≥ 1")
        if self.prefill_tokens is not None and self.prefill_tokens < 1:
            raise ValueError(f"prefill_tokens={self.prefill_tokens} is invalid: it must be ≥ 1 (or None)")
        for name in ("prefix_cache_gb", "prefix_cache_host_gb"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: it must be ≥ 0 GiB")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout={self.timeout} is invalid: it must be > 0 seconds (or None)")


# ---- what a request hears back (from the engine's thread) -------------------------------------------------
@dataclass(frozen=True)
class Started:
    prompt_tokens: int  # the prompt's positions: image tokens + prompt tokens
    cached_tokens: int = 0  # of which resumed from the prefix-state cache instead of prefilled


@dataclass(frozen=True)
class Delta:
    index: int  # which choice
    text: str


@dataclass(frozen=True)
class Finished:
    index: int
    reason: str  # "stop" (end of text or a stop string) or "length" (max_new_tokens)
    tokens: int  # tokens generated


@dataclass(frozen=True)
class Failed:
    message: str
    status: int  # the HTTP status that fits: 400 bad input, 503 shutting down, 504 timed out, 500 a bug


Event = Started | Delta | Finished | Failed


class QueueFull(RuntimeError):
    """Every slot is busy and the queue is at its limit: try again later."""


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    image: object | None  # a PIL image (or path / bytes, as `VLM.generate` takes), or None
    prompt: str  # the full prompt text, as a prompt builder renders it
    params: SamplingParams
    sink: Callable[[Event], None]
    n: int = 1  # choices: sequences decoded from the same prefilled prompt
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: bool = False
    unfinished: int = 0  # choices still decoding
    # The prompt tokenized and checked by `Engine.encode` in the caller's thread; None: the engine
    # tokenizes it at prefill (bounded by the same limits).
    tokens: PromptIds | None = None


@dataclass(eq=False)
class _Launched:
    """A decode step queued on the device: its logits (rows in `rows` order) and the rows it fed."""

    logits: torch.Tensor
    rows: list


@dataclass(eq=False)
class _Job:
    """Requests admitted together and being prefilled (request j is the job's row j); each takes its slots
    as soon as its own prompt is in."""

    job: PrefillJob
    requests: list[Request]
    opened: float
    started: set[int] = field(default_factory=set)  # rows whose requests have taken their slots

    @property
    def waiting(self) -> list[Request]:
        """The requests still being prefilled."""
        return [r for j, r in enumerate(self.requests) if j not in self.started]

    def finished(self) -> list[int]:
        """The rows whose prompts are in but whose requests have not taken their slots yet."""
        return [j for j, row in enumerate(self.job.rows) if row.done and j not in self.started]


@dataclass(eq=False)
class _Sequence:
    """One choice of a request, living in a slot (its row in the decoder)."""

    request: Request
    index: int
    prompt_ids: list[int]
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    items: list = field(default_factory=list)  # the prompt as prefix-cache items
    positions: int = 0  # the prompt's positions (image + tokens)
    ended_by_eos: bool = False
    decoder: StreamDecoder | None = None  # the answer's text, a token at a time
    text: str = ""  # the answer's text so far, as `decoder` gave it (unstripped)
    sent: str = ""  # text already emitted
    token: int = 0  # the last token chosen: the next step's input
    finished: bool = False

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def greedy_argmax(self) -> bool:
        """True when the next token is an argmax (batched over such rows; the end of text is barred
        there while the answer is shorter than min_length)."""
        p = self.params
        return (
            not p.do_sample
            and p.repetition_penalty == 1.0
            and not (p.presence_penalty or p.frequency_penalty)
        )


class Engine:
    def __init__(self, vlm: VLM, config: EngineConfig | None = None, metrics=None, decoder=None):
        """`decoder`: the slots to decode in (a `vlm.graphs` decoder of at least `config.slots` rows, e.g.
        one kept between calls); default: the fastest the model allows."""
        self.vlm = vlm
        self.config = config or EngineConfig()
        self.metrics = metrics  # a serve.metrics.Metrics, or None
        if decoder is not None and decoder.capacity < self.config.slots:
            raise ValueError(
                f"the decoder holds {decoder.capacity} rows, fewer than {self.config.slots} slots"
            )
        self.decoder = decoder or slot_decoder(vlm.lm, self.config.slots, self.config.cuda_graphs)
        gib = 2**30
        self.cache = (
            PrefixCache(int(self.config.prefix_cache_gb * gib), int(self.config.prefix_cache_host_gb * gib))
            if self.config.prefix_cache_gb > 0 or self.config.prefix_cache_host_gb > 0
            else None
        )
        self._cache_seen = CacheStats()  # the cache's counters as last reported to the metrics
        self._tok = vlm.tokenizer
        self._eos = self._tok.eos_token_id
        self._rows: list[_Sequence] = []  # row i decodes in slot i; live rows are always the first ones
        self._inflight: _Launched | None = None  # the decode step queued ahead of the host's work
        self._waiting: deque[Request] = deque()
        self._jobs: list[_Job] = []  # admitted requests being prefilled, oldest first
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None  # the last fault of the engine loop, if any ever came
        self.restarts = 0  # times the supervisor restarted the engine loop after a fault
        # the engine thread's time by phase, in seconds (see `PHASES`); also mambavl_engine_seconds
        self.phase_seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        vlm.positions_per_view  # noqa: B018 (measured once here, before any worker thread asks for it)

    # ---- the callers' side -----------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._warm_up()
            if self.config.switch_interval is not None:
                sys.setswitchinterval(self.config.switch_interval)
            self._thread = threading.Thread(target=self._run, name="mambavl-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Ends the engine thread; requests still waiting or decoding get a 503."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def max_prompt_chars(self) -> int:
        """The longest prompt text read at all (see `EngineConfig.chars_per_token`)."""
        return self.vlm.config.max_length * self.config.chars_per_token

    def check_prompt(self, prompt: str) -> None:
        """Refuses a prompt that cannot fit the model, whatever it tokenizes to, or is not text (ValueError):
        the checks that cost nothing, made before anything that costs time in proportion to the text."""
        if not isinstance(prompt, str):
            raise ValueError(f"the prompt must be a string, not {type(prompt).__name__}")
        if len(prompt) > self.max_prompt_chars:
            raise ValueError(
                f"the prompt is {len(prompt):,} characters; {self.vlm.config.name} takes at most "
                f"{self.vlm.config.max_length} positions, so prompts over {self.max_prompt_chars:,} "
                "characters are refused unread; shorten the prompt"
            )
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"the prompt is not valid Unicode text: character {e.start} is {prompt[e.start]!r} "
                f"({e.reason}); send UTF-8 text"
            ) from None

    def encode(self, prompt: str, image: PreparedImage | None = None) -> PromptIds:
        """The prompt's ids, checked against the model's length (image positions included) before any work
        on the GPU; ValueError if it is over. Called in the caller's thread (a server's worker threads),
        where tokenizing lets the engine thread run meanwhile."""
        self.check_prompt(prompt)
        tokens = self.vlm.encode_prompt(prompt, image is not None, release_gil=True)
        positions = len(tokens.ids) + (self.vlm.image_positions(image) if image is not None else 0)
        if positions > self.vlm.config.max_length:
            raise ValueError(
                f"the input is {positions} positions (image + prompt) but {self.vlm.config.name} takes at "
                f"most {self.vlm.config.max_length}; shorten the prompt"
            )
        return tokens

    def submit(self, request: Request) -> Request:
        """Queues a request (ValueError if it can never run, QueueFull or RuntimeError if not now). Give it
        `tokens` from `encode` to keep tokenizing out of the engine thread."""
        if request.n > self.config.slots:
            raise ValueError(
                f"n={request.n} choices need more slots than the server has ({self.config.slots})"
            )
        if request.tokens is None:
            self.check_prompt(request.prompt)
        with self._cond:
            if self._stopping or not self.running:
                raise RuntimeError("the engine is not running")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(
                    f"all {self.config.slots} slots are busy and {len(self._waiting)} requests are queued; "
                    "retry later"
                )
            self._waiting.append(request)
            self._cond.notify_all()
        self._gauge()
        return request

    def cancel(self, request: Request) -> None:
        """Stops a request (e.g. its client went away); its slots are freed at the next step."""
        with self._cond:
            request.cancelled = True
            self._cond.notify_all()

    def steps(self, requests: list[Request]) -> Iterator[None]:
        """Runs `requests` to their ends in the calling thread, yielding after every engine step (their
        events have reached their sinks by then): what `VLM.generate` and `stream` do. Not while the
        engine's own thread runs."""
        if self.running:
            raise RuntimeError("the engine's thread is running: submit requests to it instead")
        for request in requests:
            if request.n > self.config.slots:
                raise ValueError(
                    f"n={request.n} choices need more than the engine's {self.config.slots} slots"
                )
        self._waiting.extend(requests)
        with torch.inference_mode():
            while self._waiting or self._jobs or self._rows:
                self._drop_ended()
                self._admit()
                if self._rows:
                    self._step_or_fail()
                yield

    def stream(self, image, prompt: str, n: int = 1, **params) -> Iterator[Event]:
        """Submits a request and yields its events until it ends (a blocking convenience for scripts).
        The image is read and the prompt tokenized and checked here, in the caller's thread."""
        events: queue.Queue[Event] = queue.Queue()
        sampling = SamplingParams(**params)
        image = None if image is None else self.vlm.preprocess(image)
        tokens = self.encode(prompt, image)
        request = self.submit(Request(image, prompt, sampling, events.put, n=n, tokens=tokens))
        remaining = n
        try:
            while remaining:
                event = events.get()
                yield event
                if isinstance(event, Failed):
                    return
                remaining -= isinstance(event, Finished)
        finally:
            self.cancel(request)

    def generate(self, image, prompt: str, **params) -> str:
        """The answer to one prompt (blocking): equal to `VLM.generate` for the same arguments."""
        text = ""
        for event in self.stream(image, prompt, **params):
            if isinstance(event, Failed):
                raise RuntimeError(event.message)
            if isinstance(event, Delta):
                text += event.text
        return text

    def stats(self) -> dict:
        with self._cond:
            return {
                "slots": self.config.slots,
                "active": len(self._rows),
                "prefilling": sum(len(job.waiting) for job in self._jobs),
                "queued": len(self._waiting),
            }

    # ---- the engine thread ------------------------------------------------------------------------------
    def _warm_up(self) -> None:
        """Captures every CUDA graph the slots can need before serving (a capture costs ~1 s); with
        attention layers, for caches up to `WARM_CACHE` positions (longer ones are captured when a row
        first needs them); and the graphs of small prefills and of the towers (`VLM.warm_graphs`)."""
        sizes = [size for size in BUCKETS if size < self.config.slots] + [self.config.slots]
        with torch.inference_mode():
            if isinstance(self.decoder, GraphDecoder):
                for size in sizes:
                    self.decoder.prepare(size)
            elif isinstance(self.decoder, KVGraphDecoder):
                self.decoder.warm(sizes, min(self.vlm.config.max_length, WARM_CACHE))
            if self.config.cuda_graphs:
                self.vlm.warm_graphs()

    def _run(self) -> None:
        """The supervisor: runs the loop, and if it dies on a fault (a bug: every request's own work is
        guarded), fails the requests it held with a 500 and starts it again."""
        while True:
            try:
                with torch.inference_mode():
                    self._loop()
                break
            except Exception as e:
                self._restart(e)
            except BaseException as e:  # the interpreter is going down: every request hears of it
                self.error = e
                self._fail_all(f"the engine stopped: {type(e).__name__}: {e}", 500)
                raise
        self._fail_all("the server is shutting down", 503)

    def _loop(self) -> None:
        while True:
            with self._cond:
                idle = time.perf_counter()
                while not (self._stopping or self._waiting or self._rows or self._jobs):
                    self._cond.wait()
                self._spent("wait", idle)
                if self._stopping:
                    return
            self._drop_ended()
            self._admit()
            if self._rows:
                self._step_or_fail()
            self._gauge()

    def _restart(self, e: Exception) -> None:
        self.error = e
        self.restarts += 1
        log.error("the engine loop failed and restarts (restart %d)", self.restarts, exc_info=e)
        if self.metrics is not None:
            self.metrics.engine_restarts.inc()
        # The decoder's slots may be half-written: no sequence survives, and the next prefill reloads them.
        self._fail_all(f"the engine failed and restarted: {type(e).__name__}: {e}", 500)

    def _fail_all(self, message: str, status: int) -> None:
        with self._cond:
            pending = list(self._waiting) + [r for job in self._jobs for r in job.waiting]
            pending += [s.request for s in self._rows]
            self._waiting.clear()
            self._jobs.clear()
            self._rows.clear()
            self._inflight = None
        for request in dict.fromkeys(pending):
            self._fail(request, message, status)

    def _emit(self, request: Request, event: Event) -> None:
        if request.done:
            return
        try:
            request.sink(event)
        except Exception:  # the listener is gone (its event loop closed): nobody wants the rest
            request.cancelled = True

    def _fail(self, request: Request, message: str, status: int) -> None:
        if request.done:  # it has had its answer (or its failure) already
            return
        self._emit(request, Failed(message, status))
        request.done = True
        self._count({400: "rejected", 503: "shutdown", 504: "timeout"}.get(status, "failed"))

    def _end(self, request: Request, what: str, e: Exception) -> None:
        """Fails one request for a fault in its own work (500: the input was checked, so it is our bug)
        and frees its rows at the next `_retire`; the other requests go on."""
        log.error("%s failed for %s", what, request.id, exc_info=e)
        self._fail(request, f"{what} failed: {type(e).__name__}: {e}", 500)
        for s in self._rows:
            if s.request is request:
                s.finished = True

    def _expired(self, request: Request, now: float) -> bool:
        timeout = self.config.timeout
        return timeout is not None and now - request.submitted > timeout

    def _drop_ended(self) -> None:
        """Removes cancelled and timed-out requests, waiting or decoding."""
        now = time.monotonic()
        with self._cond:
            gone = [r for r in self._waiting if r.cancelled or self._expired(r, now)]
            if gone:
                self._waiting = deque(r for r in self._waiting if not (r.cancelled or self._expired(r, now)))
        for r in gone:
            if r.cancelled:
                r.done = True
                self._count("cancelled")
            else:
                self._fail(r, f"timed out after {self.config.timeout:g} s waiting for a slot", 504)
        ended = [s for s in self._rows if s.request.cancelled or self._expired(s.request, now)]
        for request in dict.fromkeys(s.request for s in ended):
            if request.cancelled:
                request.done = True
                self._count("cancelled")
            else:
                self._fail(request, f"timed out after {self.config.timeout:g} s", 504)
        for s in ended:
            s.finished = True
        self._retire()

    def _admit(self) -> None:
        """Moves waiting requests that slots are free for into a prefill job, then prefills one step."""
        free = self.config.slots - len(self._rows) - sum(r.n for job in self._jobs for r in job.waiting)
        batch: list[Request] = []
        with self._cond:  # first come, first served: a big `n` at the head waits for enough slots
            while self._waiting and len(batch) < self.config.prefill_batch and self._waiting[0].n <= free:
                request = self._waiting.popleft()
                free -= request.n
                batch.append(request)
        started = time.monotonic()
        batch = [r for r in batch if self._ready(r)]
        if batch:
            opened = time.perf_counter()
            with record_function("engine.open"):  # the phases show in a profile (`bench --serve`) too
                self._open(batch)
            self._spent("open", opened)
        worked = self._prefill_step() or bool(batch)  # the step runs whether or not anything is measured
        if worked and self.metrics is not None:
            self.metrics.prefill_work_seconds.observe(time.monotonic() - started)

    def _ready(self, request: Request) -> bool:
        """Reads the image and tokenizes the prompt of a request submitted without `tokens` (a script's;
        the server's come tokenized), failing it alone if they are bad."""
        if request.tokens is not None:
            return True
        try:
            if request.image is not None:
                request.image = self.vlm.preprocess(request.image)
            request.tokens = self.encode(request.prompt, request.image)
            return True
        except (ValueError, ImageError) as e:
            self._fail(request, str(e), 400)
        except Exception as e:
            self._end(request, "reading the request", e)
        return False

    def _open(self, batch: list[Request]) -> None:
        """Starts prefilling a batch (cache lookups, the towers, checks), isolating a request at fault."""
        try:
            images = [None if r.image is None else self.vlm.preprocess(r.image) for r in batch]
            job = PrefillJob(self.vlm, images, [r.tokens for r in batch], self.cache, self.config.cuda_graphs)
        except Exception as e:
            if len(batch) > 1:  # find the request at fault: open them one by one
                for request in batch:
                    self._open([request])
                return
            if isinstance(e, ValueError | ImageError):
                self._fail(batch[0], str(e), 400)
            else:
                self._end(batch[0], "prefill", e)
            return
        self._jobs.append(_Job(job, batch, time.monotonic()))
        self._cache_metrics()

    def _prefill_step(self) -> bool:
        """Prefills up to `prefill_tokens` positions of the open jobs, oldest first; the requests of a job
        that is done take their slots. Whether there was any job to work on."""
        budget = self.config.prefill_tokens
        worked = bool(self._jobs)
        began, started_before = time.perf_counter(), self.phase_seconds["start"]
        try:
            with record_function("engine.prefill"):
                self._prefill_jobs(budget)
        finally:  # the slots' loading is its own phase
            self._spent("prefill", began, self.phase_seconds["start"] - started_before)
        return worked

    def _prefill_jobs(self, budget: int | None) -> None:
        """`_prefill_step`'s work: `budget` positions (None: no limit) over the open jobs, oldest first. A
        request whose prompt is in takes its slots at once, while the rest of its job goes on."""
        for entry in list(self._jobs):
            if budget is not None and budget <= 0:
                break
            while True:  # rows can be done before any step (the whole prompt cached): they start too
                try:
                    used = 0 if entry.job.done else entry.job.step(budget)  # it stops at each snapshot
                    rows = entry.finished()
                    out = entry.job.result(rows) if rows else None
                except Exception as e:  # shared by the rows in it: each fails, the other requests go on
                    self._jobs.remove(entry)
                    for request in entry.waiting:
                        self._end(request, "prefill", e)
                    break
                if budget is not None:
                    budget -= used
                if rows:
                    entry.started.update(rows)
                    began = time.perf_counter()
                    items = [entry.job.rows[j].items for j in rows]
                    with record_function("engine.start"):
                        self._start([entry.requests[j] for j in rows], out, items)
                    self._spent("start", began)
                if entry.job.done or (budget is not None and budget <= 0):
                    break
            if entry.job.done and entry in self._jobs:
                self._jobs.remove(entry)
                if self.metrics is not None:
                    self.metrics.prefill_seconds.observe(time.monotonic() - entry.opened)
                self._cache_metrics()

    def _start(self, batch: list[Request], out: Prefilled, items: list[list]) -> None:
        """Prefilled requests take their slots and choose their first tokens."""
        new: list[_Sequence] = []
        rows: list[int] = []
        now = time.monotonic()
        for j, request in enumerate(batch):
            if request.cancelled and not request.done:  # while it was being prefilled
                request.done = True
                self._count("cancelled")
            elif self._expired(request, now):
                self._fail(request, f"timed out after {self.config.timeout:g} s", 504)
            if request.done:
                continue
            try:
                seqs = [
                    _Sequence(request, index, out.prompt_ids[j], self._generator(request, index))
                    for index in range(request.n)
                ]
            except Exception as e:
                self._end(request, "seeding", e)
                continue
            for seq in seqs:
                seq.items, seq.positions = items[j], out.positions[j]
                seq.decoder = self._tok.stream()
            self._emit(request, Started(out.positions[j], out.cached[j]))
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(out.positions[j] - out.cached[j])
                self.metrics.time_to_first_token.observe(time.monotonic() - request.submitted)
            request.unfinished = request.n
            new.extend(seqs)
            rows.extend([j] * request.n)
        if not new:
            return
        first = len(self._rows)
        self._rows.extend(new)
        try:
            state = LMState.stack([out.states[j] for j in rows])
            self.decoder.load(state, list(range(first, first + len(new))))
        except Exception as e:  # shared by the batch: each of its requests fails, the live ones go on
            for request in dict.fromkeys(s.request for s in new):
                self._end(request, "loading the prefilled state", e)
            self._retire()
            return
        logits = out.logits[to_device(rows, out.logits.device)]
        chosen = self._choose(logits, new)
        self._advance(new, chosen, self._answer_states(new, chosen, logits))
        self._retire()

    def _generator(self, request: Request, index: int) -> torch.Generator | None:
        seed = request.params.seed
        return None if seed is None else seeded_generator(seed, self.vlm.device, index)

    def _step_or_fail(self) -> None:
        try:
            self._step()
        except Exception as e:  # e.g. out of memory: the live requests fail, the server goes on
            for request in dict.fromkeys(s.request for s in self._rows):
                self._fail(request, f"decoding failed: {type(e).__name__}: {e}", 500)
            for s in self._rows:
                s.finished = True
            self._inflight = None
            self._retire()

    def _launch(self) -> _Launched:
        """Queues one decode step of every live row (each feeds its `token`) on the device."""
        rows = list(self._rows)
        tokens = torch.tensor([s.token for s in rows], device=self.vlm.device)
        return _Launched(self.decoder.step(tokens), rows)

    @record_function("engine.step")
    def _step(self) -> None:
        """Takes the step in flight (or runs one), chooses every row's next token, queues the next step at
        once, and then, while the device runs it, does this step's host work (detokenizing, stop strings,
        events). A row that this step ends is fed once more by the queued step, to no effect: its slot is
        freed, and the state its answer ends at was copied for the prefix cache before that step."""
        started = time.perf_counter()
        launched, self._inflight = self._inflight or self._launch(), None
        at = {id(s): j for j, s in enumerate(launched.rows)}
        seqs = [s for s in self._rows if id(s) in at]  # rows that joined since wait for the next step
        logits, index = launched.logits, [at[id(s)] for s in seqs]
        if index != list(range(len(launched.rows))):  # rows left since it was queued
            logits = logits[torch.tensor(index, dtype=torch.long, device=logits.device)]
        chosen = self._choose(logits, seqs) if seqs else []
        if self.metrics is not None:
            self.metrics.step_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(seqs))
        answers = self._answer_states(seqs, chosen, logits)
        for s, token in zip(seqs, chosen, strict=True):
            if token is not None:
                s.token = token
        going_on = any(not s.finished and i not in answers for i, s in enumerate(seqs))
        if going_on or len(seqs) < len(self._rows):
            self._inflight = self._launch()  # every row that goes on is fed its token now
        advancing = self._spent("step", started)
        with record_function("engine.advance"):
            self._advance(seqs, chosen, answers)
            self._retire()
        self._spent("advance", advancing)

    def _answer_states(self, seqs: list[_Sequence], chosen: list[int | None], logits: torch.Tensor) -> dict:
        """Rows whose chosen token ends them (the end of text, or max_new_tokens), by index: with the prefix
        cache on, (their state now, their logits), copied before the next step is queued; None without."""
        ends = {
            i
            for i, (s, token) in enumerate(zip(seqs, chosen, strict=True))
            if token is not None
            and not s.finished
            and (token == self._eos or len(s.ids) + 1 >= s.params.max_new_tokens)
        }
        if self.cache is None or not ends:
            return dict.fromkeys(ends)
        order = sorted(ends)
        try:
            states = self.decoder.read([self._rows.index(seqs[i]) for i in order])
            kept = logits[torch.as_tensor(order, device=logits.device)].float()
        except Exception:  # the cache is an optimisation: a failure to keep a snapshot is logged, not fatal
            log.exception("could not keep the finished answers' states")
            return dict.fromkeys(ends)
        if len(order) == 1:
            return {order[0]: (states, kept[0])}
        # each its own copy: a snapshot must not keep the others' memory alive after they are evicted
        return {
            i: (states.map(lambda t, k=k: t[k : k + 1]).clone(), kept[k].clone()) for k, i in enumerate(order)
        }

    def _choose(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int | None]:
        """The next token of every row: plain greedy rows in one argmax, the others one by one (None
        where choosing failed: that row's request has failed alone)."""
        vocab = self._tok.vocab_size
        chosen: list[int | None] = [None] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.greedy_argmax()]
        if greedy:
            rows = (
                logits if len(greedy) == len(seqs) else logits[torch.as_tensor(greedy, device=logits.device)]
            )[:, :vocab]
            short = [k for k, i in enumerate(greedy) if len(seqs[i].ids) < seqs[i].params.min_length]
            if short:
                rows = rows.clone()
                rows[torch.as_tensor(short, device=rows.device), self._eos] = float("-inf")
            picks = greedy_tokens(rows).tolist()
            for i, token in zip(greedy, picks, strict=True):
                chosen[i] = token
        # the other rows in one call per set of sampling options (a few kernels for all, not for each);
        # a row that samples with a seed of its own, alone, from its generator
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            if chosen[i] is None and not s.finished:
                own = s.generator is not None and s.params.do_sample
                groups.setdefault((_sampling_key(s), id(s) if own else None), []).append(i)
        for rows in groups.values():
            tokens = self._sample([seqs[i] for i in rows], logits, rows, vocab)
            for i, token in zip(rows, tokens, strict=True):
                chosen[i] = token
        return chosen

    def _sample(
        self, group: list[_Sequence], logits: torch.Tensor, rows: list[int], vocab: int
    ) -> list[int | None]:
        """The next tokens of rows that share their sampling options (`_sampling_key`), in one call; one
        row with a seed samples from its own generator. If the call fails, a group samples again row by
        row, and a row that fails alone fails its request (None)."""
        p = group[0].params
        history = [s.prompt_ids + s.ids if p.repetition_penalty != 1.0 else [] for s in group]
        generator = group[0].generator if len(group) == 1 else None
        try:
            ids = next_tokens(
                logits[to_device(rows, logits.device)], p, history, len(group[0].ids), self._eos, vocab,
                generator, [s.ids for s in group],
            )  # fmt: skip
            return ids.tolist()
        except Exception as e:
            if len(group) == 1:
                self._end(group[0].request, "sampling", e)
                return [None]
            log.exception("sampling %d rows together failed; sampling them one by one", len(group))
            return [self._sample([s], logits, [i], vocab)[0] for s, i in zip(group, rows, strict=True)]

    def _advance(self, seqs: list[_Sequence], chosen: list[int | None], answers: dict) -> None:
        """Appends each row's chosen token; `answers`: the states the rows' answers end at, by index, as
        `_answer_states` copied them (an answer that a stop string ends has none: no snapshot is kept)."""
        for i, (s, token) in enumerate(zip(seqs, chosen, strict=True)):
            if s.finished or token is None:
                continue
            try:
                ended = self._advance_one(s, token)
            except Exception as e:
                self._end(s.request, "detokenizing", e)
                continue
            if ended and answers.get(i) is not None:
                self._keep_answer(s, *answers[i])

    def _keep_answer(self, s: _Sequence, state: LMState, logits: torch.Tensor) -> None:
        """Keeps the state at the end of a finished answer in the prefix cache: the prompt and the tokens
        fed so far (the last one chosen is not fed unless it is the end of text, which is never fed).
        A conversation's next turn starts there."""
        if self.cache is None:
            return
        fed = s.ids if s.ended_by_eos else s.ids[:-1]
        try:
            self.cache.insert([*s.items, *fed], Snapshot(state, logits, s.positions + len(fed)))
        except Exception:  # the cache is an optimisation: a failure to keep a snapshot is logged, not fatal
            log.exception("could not keep a finished answer's state")
        self._cache_metrics()

    def _advance_one(self, s: _Sequence, token: int) -> bool:
        """Appends `token` to the sequence; True when that ended it."""
        if token == self._eos:
            s.ended_by_eos = True
            self._finish(s, "stop", _shown(self._tok.decode(s.ids)))
            return True
        s.ids.append(token)
        s.token = token
        if self.metrics is not None:
            self.metrics.generation_tokens.inc()
        # only the new text is decoded, and only where it can complete a stop string searched for
        before = len(_shown(s.text))
        s.text += s.decoder.step(token)
        text = _shown(s.text)
        hit = [i for stop in s.params.stop if (i := text.find(stop, max(0, before - len(stop) + 1))) >= 0]
        if hit:
            self._finish(s, "stop", text[: min(hit)])
        elif len(s.ids) >= s.params.max_new_tokens:  # the whole answer once, an unfinished character too
            self._finish(s, "length", _shown(self._tok.decode(s.ids)))
        else:
            self._send(s, text[: _safe_length(text, s.params.stop)])
            return False
        return True

    def _send(self, s: _Sequence, text: str) -> None:
        if len(text) > len(s.sent) and text.startswith(s.sent):
            self._emit(s.request, Delta(s.index, text[len(s.sent) :]))
            s.sent = text

    def _finish(self, s: _Sequence, reason: str, text: str) -> None:
        self._send(s, text.rstrip())
        s.finished = True
        self._emit(s.request, Finished(s.index, reason, len(s.ids)))
        s.request.unfinished -= 1
        if s.request.unfinished == 0:
            s.request.done = True
            self._count(reason)
            if self.metrics is not None:
                self.metrics.request_seconds.observe(time.monotonic() - s.request.submitted)

    def _retire(self) -> None:
        """Frees the slots of finished sequences, moving the last live row into each hole."""
        for i in reversed(range(len(self._rows))):
            if self._rows[i].finished:
                last = len(self._rows) - 1
                if i != last:
                    self.decoder.move(last, i)
                    self._rows[i] = self._rows[last]
                self._rows.pop()

    def _cache_metrics(self) -> None:
        """Brings the prefix cache's Prometheus series up to date with its counters."""
        if self.cache is None or self.metrics is None:
            return
        now, seen = self.cache.stats, self._cache_seen
        m = self.metrics
        m.prefix_cache_hits.inc(now.hits - seen.hits)
        m.prefix_cache_lookups.inc(now.lookups - seen.lookups)
        m.prefix_cache_hit_tokens.inc(now.hit_positions - seen.hit_positions)
        m.prefix_cache_evictions.inc(now.evictions - seen.evictions)
        m.prefix_cache_bytes.labels(tier="device").set(now.bytes_device)
        m.prefix_cache_bytes.labels(tier="host").set(now.bytes_host)
        m.prefix_cache_entries.set(now.entries)
        self._cache_seen = replace(now)

    def _spent(self, phase: str, since: float, less: float = 0.0) -> float:
        """Adds the time since `since` (perf_counter), less `less` seconds, to `phase`; returns now."""
        now = time.perf_counter()
        seconds = max(0.0, now - since - less)
        self.phase_seconds[phase] += seconds
        if self.metrics is not None:
            self.metrics.engine_seconds.labels(phase=phase).inc(seconds)
        return now

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(outcome=outcome).inc()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.slots_used.set(len(self._rows))
            self.metrics.queue_length.set(len(self._waiting))


def _sampling_key(s: _Sequence) -> tuple:
    """What `next_tokens` reads of a row's options at this step: rows with equal keys sample together."""
    p = s.params
    return (
        p.do_sample, p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.presence_penalty,
        p.frequency_penalty, len(s.ids) < p.min_length,
    )  # fmt: skip


def _shown(text: str) -> str:
    """What an answer shows: without leading whitespace (as `VLM.generate` strips it)."""
    return text.lstrip()


def _safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of a growing answer can be sent now: not trailing whitespace (the end strips it), not an
    unfinished UTF-8 character, not a tail that may be the start of a stop string."""
    end = len(text.rstrip())
    held = 0  # an unfinished UTF-8 character decodes to at most 3 U+FFFD; any before them are final
    while end and held < 3 and text[end - 1] == "\ufffd":
        end -= 1
        held += 1
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                end = min(end, len(text) - k)
                break
    return end
