"""Our side of `mambavl bench`: a preset at full size with random weights, measured through the code paths
users run (`VLM.encode_images`, `VLM.prefill`, the CUDA-graph `GraphDecoder`), never a special fast path.

Timing: `torch.cuda.synchronize()` around each call, warm-up first, median of repeats.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from PIL import Image

from mambavl.bench.timing import sync, timed
from mambavl.vlm.graphs import KVGraphDecoder, graph_decoder, graph_support
from mambavl.vlm.model import VLM

GIB = 2**30


def peak_memory(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def copy_bandwidth(device: torch.device, nbytes: int = 2 * GIB) -> float | None:
    """Bytes/s of a device-to-device copy (read + write counted), the roofline's memory speed."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), repeat=10, warmup=2, device=device)
    return 2 * nbytes / seconds


def synthetic_image(size: int = 640) -> Image.Image:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _ids(vlm: VLM, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(length)
    return torch.randint(0, vlm.config.lm.vocab_size, (batch, length), generator=g).to(vlm.device)


@torch.inference_mode()
def time_to_first_token(vlm: VLM, prompt_tokens: int = 800, repeat: int = 10) -> dict:
    """One image encoded (both towers and the projector) and spliced before `prompt_tokens` text tokens,
    prefilled, and the first token chosen (greedy), all on the device: seconds from pixels on the device
    to the first token id on the host. Image preprocessing on the CPU is reported separately."""
    device = vlm.device
    image = synthetic_image()
    preprocess = timed(lambda: vlm.pixel_values([image]), repeat=repeat, device=device)
    pixels = vlm.pixel_values([image])
    ids = _ids(vlm, 1, prompt_tokens)

    def encode(graphs: bool = True):
        return vlm.encode_images(pixels, graphs)

    def first_token(graphs: bool = True):
        embeds = torch.cat([encode(graphs), vlm.lm.embedding(ids)], dim=1)
        lengths = torch.tensor([embeds.shape[1]], device=device)
        last = vlm.prefill(embeds, lengths, vlm.lm.new_state(1), graphs)
        return int(vlm.lm.lm_head(last).argmax(-1)[0])

    positions = encode().shape[1] + prompt_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "positions": positions,
        "ttft_s": timed(first_token, repeat=repeat, warmup=2, device=device),
        # the towers and the prefill eager (no CUDA graphs before the first token), for comparison
        "ttft_eager_s": timed(lambda: first_token(False), repeat=repeat, warmup=1, device=device),
        "vision_s": timed(encode, repeat=repeat, warmup=2, device=device),
        "preprocess_cpu_s": preprocess,
    }


@torch.inference_mode()
def prefill(vlm: VLM, lengths: list[int], repeat: int = 3) -> dict[int, dict]:
    """Batch-1 prefill of `lengths` text tokens (chunked as `VLM.prefill` does), and the peak memory it
    takes (weights included), per length."""
    device, out = vlm.device, {}
    for length in lengths:
        ids = _ids(vlm, 1, length)
        lengths_t = torch.tensor([length], device=device)

        def run(ids=ids, lengths_t=lengths_t):
            embeds = vlm.lm.embedding(ids)
            return vlm.lm.lm_head(vlm.prefill(embeds, lengths_t, vlm.lm.new_state(1)))

        try:
            run()  # warm-up, then the peak of one call
            reset_peak(device)
            run()
            peak = peak_memory(device)
            seconds = timed(run, repeat=repeat if length <= 16384 else 1, warmup=0, device=device)
            out[length] = {"s": seconds, "tok_s": length / seconds, "peak_gib": peak}
        except torch.OutOfMemoryError:
            out[length] = {"error": "out of memory"}
            torch.cuda.empty_cache()
    return out


@torch.inference_mode()
def decode(vlm: VLM, batches: list[int], tokens: int = 256, graphs: bool = True) -> dict[int, dict]:
    """Steady-state decode tokens/s (all rows) at each batch size: the graph replayed once per token, the
    greedy choice made on the device and fed back, and one host sync per token (the end-of-text check a
    real decode loop makes). With `graphs=False`, the eager step `generate` falls back to."""
    device, out = vlm.device, {}
    eos = 0
    for batch in batches:
        tokens_in = _ids(vlm, batch, 1)[:, 0]
        if graphs:
            decoder = graph_decoder(vlm.lm, batch)
            decoder.load(vlm.lm.new_state(batch))
            if isinstance(decoder, KVGraphDecoder):  # every cache-length graph the timed steps reach
                decoder.warm([batch], 8 + 3 * tokens + 1)
            else:
                decoder.prepare(batch)

            def step(tok, decoder=decoder):
                return decoder.step(tok).argmax(-1)

        else:
            state = vlm.lm.new_state(batch)

            def step(tok, state=state):
                return vlm.lm.lm_head(vlm.lm(tok[:, None], state=state, return_hidden=True)[:, -1]).argmax(-1)

        def loop(n, tok=tokens_in, step=step):
            for _ in range(n):
                tok = step(tok)
                if bool((tok == eos).all()):
                    break

        loop(8)
        seconds = timed(lambda loop=loop: loop(tokens), repeat=3, warmup=0, device=device)
        out[batch] = {"tok_s": batch * tokens / seconds, "step_ms": 1e3 * seconds / tokens}
        if graphs:
            del decoder
            torch.cuda.empty_cache()
    return out


def decode_bytes(vlm: VLM, batch: int) -> int:
    """Bytes a decode step must move at least: every LM weight once (the embedding is a row lookup; a
    tied head counts once), and each sequence's state read and written."""
    lm = vlm.lm
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    if not lm.config.tie_embeddings:
        weights -= lm.embedding.weight.numel() * lm.embedding.weight.element_size()
    state = lm.new_state(1, device="meta").nbytes
    return weights + 2 * batch * state


CATEGORIES = (
    ("gemm", ("gemm", "matmul", "sm90", "sm80", "cutlass", "cublas", "nvjet", "xmma")),
    ("selective scan", ("selective_scan", "_scan")),
    ("state update", ("state_update",)),
    ("ssd", ("chunk", "ssd", "state_passing")),
    ("conv1d", ("conv",)),
    ("rms norm", ("rms", "norm")),
    ("softmax/sampling", ("softmax", "argmax", "topk", "sort")),
    ("elementwise/copies", ("elementwise", "copy", "vectorized", "cat", "fill", "index")),
)


def kernel_category(kernel: str) -> str:
    """The category (`CATEGORIES`) a CUDA kernel's name falls in, or "other"."""
    name = kernel.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in name for k in keys)), "other")


@torch.inference_mode()
def profile(vlm: VLM, prefill_tokens: int = 16384, decode_steps: int = 16) -> dict:
    """Where the GPU time goes: kernel time by category for one prefill and for eager decode steps at
    batch 1 (graphs replay the same kernels; the profiler cannot see inside a replay)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = vlm.device
    if device.type != "cuda":
        return {}
    out = {}
    ids = _ids(vlm, 1, prefill_tokens)
    state = vlm.lm.new_state(1)

    def do_prefill():
        vlm.prefill(vlm.lm.embedding(ids), torch.tensor([prefill_tokens], device=device), vlm.lm.new_state(1))

    def do_decode():
        tok = ids[:, -1]
        for _ in range(decode_steps):
            tok = vlm.lm.lm_head(vlm.lm(tok[:, None], state=state, return_hidden=True)[:, -1]).argmax(-1)

    for name, fn in (("prefill", do_prefill), ("decode", do_decode)):
        fn()
        sync(device)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        by_cat: dict[str, float] = defaultdict(float)
        top: dict[str, float] = defaultdict(float)
        for event in prof.events():
            us = getattr(event, "device_time", 0.0) or 0.0
            if event.device_type.name != "CUDA" or us <= 0:
                continue
            by_cat[kernel_category(event.name)] += us
            top[event.name] += us
        total = sum(by_cat.values()) or 1.0
        out[name] = {
            "kernel_ms": total / 1e3,
            "share": {k: v / total for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": {k[:90]: v / 1e3 for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]},
        }
    return out


def measure(
    vlm: VLM,
    *,
    ttft_tokens: int,
    prefill_lengths: list[int],
    decode_batches: list[int],
    decode_tokens: int,
    with_profile: bool = True,
) -> dict:
    device = vlm.device
    result: dict = {"graphs": graph_support(vlm.lm) or "captured per batch bucket"}
    bandwidth = copy_bandwidth(device)
    result["copy_bandwidth_tb_s"] = None if bandwidth is None else bandwidth / 1e12
    result["ttft"] = time_to_first_token(vlm, ttft_tokens)
    result["prefill"] = prefill(vlm, prefill_lengths)
    graphs = graph_support(vlm.lm) is None
    result["decode"] = decode(vlm, decode_batches, decode_tokens, graphs=graphs)
    result["decode_eager_b1"] = decode(vlm, [1], min(decode_tokens, 64), graphs=False)[1]
    if bandwidth is not None:
        result["roofline_tok_s"] = {b: b * bandwidth / decode_bytes(vlm, b) for b in decode_batches}
        result["roofline_fraction"] = {
            b: result["decode"][b]["tok_s"] / result["roofline_tok_s"][b] for b in decode_batches
        }
    if with_profile:
        result["profile"] = profile(vlm)
    return result
