"""The server's Prometheus metrics, in a registry of their own (one per server, no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, slots: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "mambavl_requests",
            "Requests ended, by outcome (stop, length, cancelled, rejected, timeout, shutdown, failed)",
            ["outcome"],
            registry=r,
        )
        self.http_responses = Counter(
            "mambavl_http_responses", "HTTP responses, by route and status", ["route", "status"], registry=r
        )
        self.connections = Gauge("mambavl_connections", "Open HTTP connections", registry=r)
        self.client_timeouts = Counter(
            "mambavl_client_timeouts",
            "Connections closed because the client was too slow sending a request's headers, or the rest of "
            "a body the server refused",
            ["phase"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mambavl_prompt_tokens", "Positions prefilled (image + text)", registry=r
        )
        self.generation_tokens = Counter("mambavl_generation_tokens", "Tokens generated", registry=r)
        self.image_cache = Counter(
            "mambavl_image_cache",
            "Request images found prepared by their bytes (hit) or decoded and transformed anew (miss)",
            ["result"],
            registry=r,
        )
        self.slots_total = Gauge("mambavl_slots", "State slots (sequences decoded together)", registry=r)
        self.slots_total.set(slots)
        self.slots_used = Gauge("mambavl_slots_used", "Slots holding a live sequence", registry=r)
        self.queue_length = Gauge("mambavl_queue_length", "Requests waiting for a slot", registry=r)
        self.engine_restarts = Counter(
            "mambavl_engine_restarts",
            "Times the engine loop failed and was restarted (the requests it held failed with a 500)",
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "mambavl_time_to_first_token_seconds",
            "Submission to the end of prefill",
            buckets=LATENCY,
            registry=r,
        )
        self.request_seconds = Histogram(
            "mambavl_request_seconds", "Submission to the last token", buckets=LATENCY, registry=r
        )
        self.prefill_seconds = Histogram(
            "mambavl_prefill_seconds",
            "One prefill batch from its admission to its last position (towers, projector, LM), the decode "
            "steps and other batches' prefill in between included",
            buckets=LATENCY,
            registry=r,
        )
        self.prefill_work_seconds = Histogram(
            "mambavl_prefill_work_seconds",
            "Engine time spent prefilling in one engine step: opening prefill batches (cache lookups, the "
            "towers, the projector) and their LM positions; its sum over steps is the engine's prefill time",
            buckets=LATENCY,
            registry=r,
        )
        self.step_seconds = Histogram(
            "mambavl_decode_step_seconds",
            "One decode step of the whole batch, sampling included",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.engine_seconds = Counter(
            "mambavl_engine_seconds",
            "The engine thread's time by phase: open (cache lookups, towers, projector), prefill (LM "
            "positions, snapshots), start (prefilled states into slots, first tokens), step (decode steps, "
            "sampling), advance (detokenizing, stop strings, streaming out), wait (nothing to do); host "
            "time, including the waits for the GPU that reading results makes",
            ["phase"],
            registry=r,
        )
        self.batch_size = Histogram(
            "mambavl_decode_batch_size",
            "Live sequences per decode step",
            buckets=(1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256),
            registry=r,
        )

        self.prefix_cache_lookups = Counter(
            "mambavl_prefix_cache_lookups", "Prompts looked up in the prefix-state cache", registry=r
        )
        self.prefix_cache_hits = Counter(
            "mambavl_prefix_cache_hits", "Prompts resumed from a cached prefix state", registry=r
        )
        self.prefix_cache_hit_tokens = Counter(
            "mambavl_prefix_cache_hit_tokens",
            "Prompt positions resumed from the cache, not prefilled",
            registry=r,
        )
        self.prefix_cache_evictions = Counter(
            "mambavl_prefix_cache_evictions",
            "Snapshots dropped from the prefix cache for its budget",
            registry=r,
        )
        self.prefix_cache_bytes = Gauge(
            "mambavl_prefix_cache_bytes",
            "Bytes of snapshots held, by tier (device, host)",
            ["tier"],
            registry=r,
        )
        self.prefix_cache_entries = Gauge("mambavl_prefix_cache_entries", "Snapshots held", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
