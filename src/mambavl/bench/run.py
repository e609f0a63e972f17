"""`mambavl bench`: one run measures a preset (random weights at full size) and its peers side by side,
then writes `bench.json`, `bench.png` and prints a table.

Peers (`bench.peers`): transformers' own Mamba on the same LM config, a same-size transformer (GPT-NeoX
2.8B, SDPA) through HF generate, and mamba_ssm when it is importable. Ours runs first and is freed before
the peers load, so each peak-memory figure holds one model only.
"""

from __future__ import annotations

import gc
import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch

from mambavl.bench import ours

PEERS = ("hf-mamba", "gpt-neox", "mamba-ssm")


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "cobra+3b"
    out: Path = Path("bench")
    dtype: str = "bfloat16"
    device: str = "cuda"
    ttft_tokens: int = 800
    prefill_lengths: tuple[int, ...] = (1024, 4096, 16384, 65536, 131072)
    decode_batches: tuple[int, ...] = (1, 8, 64)
    decode_tokens: int = 256
    peers: tuple[str, ...] = PEERS
    peer_prefill_lengths: tuple[int, ...] = (800, 1024, 4096, 16384, 65536)
    profile: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.peers) - set(PEERS)
        if unknown:
            raise ValueError(f"unknown peers {sorted(unknown)}: choose from {', '.join(PEERS)}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")


def environment(device: torch.device) -> dict:
    import transformers

    import mambavl

    env = {
        "date": date.today().isoformat(),
        "mambavl": mambavl.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def run(cfg: BenchConfig, console=None) -> dict:
    from mambavl.bench.peers import run_peers
    from mambavl.vlm.model import create

    say = console.print if console is not None else print
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "no CUDA GPU is visible: run the benchmark on a GPU machine (or pass --device cpu)"
        )
    dtype = getattr(torch, cfg.dtype)
    cfg.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"config": _jsonable(asdict(cfg)), "environment": environment(device)}

    say(f"[bold]{cfg.preset}[/bold]: building with random weights ({cfg.dtype}, {device})")
    vlm = create(cfg.preset, device=device, dtype=dtype).eval()
    lm_config = vlm.config.lm
    result["parameters"] = {"total": vlm.num_parameters(), "lm": vlm.lm.num_parameters()}
    result["mambavl"] = ours.measure(
        vlm,
        ttft_tokens=cfg.ttft_tokens,
        prefill_lengths=list(cfg.prefill_lengths),
        decode_batches=list(cfg.decode_batches),
        decode_tokens=cfg.decode_tokens,
        with_profile=cfg.profile,
    )
    _write(cfg.out, result)
    say("mambavl measured; now the peers")
    del vlm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    peers = run_peers(
        lm_config,
        list(cfg.peers),
        decode_batches=list(cfg.decode_batches),
        decode_tokens=cfg.decode_tokens,
        prefill_lengths=list(cfg.peer_prefill_lengths),
        dtype=dtype,
        device=device,
    )
    result["peers"] = [asdict(p) for p in peers]
    _write(cfg.out, result)
    plot(result, cfg.out / "bench.png")
    if console is not None:
        console.print(table(result))
    return result


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _write(out: Path, result: dict) -> None:
    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps(_jsonable(result), indent=2))
    tmp.replace(out / "bench.json")


def _fmt(value, spec: str = ",.0f", missing: str = "—") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return missing
    return format(value, spec)


def rows(result: dict) -> list[tuple[str, ...]]:
    """Table rows: system, decode tok/s per batch, prefill s per length, peak GiB at the longest prompt."""
    batches = [int(b) for b in result["config"]["decode_batches"]]
    ours_r = result["mambavl"]
    out = []
    decode = [_fmt(ours_r["decode"].get(b, {}).get("tok_s")) for b in batches]
    pre = ours_r["prefill"]
    pre_s = " / ".join(f"{int(k) // 1024}k {_fmt(v.get('s'), '.3f')} s" for k, v in pre.items())
    ttft = f"TTFT {1e3 * ours_r['ttft']['ttft_s']:.1f} ms"
    if "ttft_eager_s" in ours_r["ttft"]:
        ttft += f" (eager {1e3 * ours_r['ttft']['ttft_eager_s']:.1f})"
    out.append(("mambavl", *decode, f"{ttft}; {pre_s}"))
    for peer in result.get("peers", []):
        if peer.get("error"):
            out.append((peer["name"], *(["—"] * len(batches)), f"not run: {peer['error'][:80]}"))
            continue
        dec = [_fmt(peer["decode_tok_s"].get(b)) for b in batches]
        pre = " / ".join(f"{k} {_fmt(v, '.3f')} s" for k, v in peer["prefill_s"].items())
        out.append((peer["name"], *dec, pre))
    return out


def table(result: dict):
    from rich.table import Table

    batches = result["config"]["decode_batches"]
    t = Table(title=f"mambavl bench: {result['config']['preset']} on {result['environment']['device']}")
    t.add_column("system")
    for b in batches:
        t.add_column(f"decode b{b} tok/s", justify="right")
    t.add_column("prefill")
    for row in rows(result):
        t.add_row(*row)
    return t


def plot(result: dict, path: Path) -> Path | None:
    """Prefill tokens/s and peak memory against prompt length, ours and the peers (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    series = {"mambavl": {int(k): v for k, v in result["mambavl"]["prefill"].items() if "s" in v}}
    for peer in result.get("peers", []):
        if not peer.get("error"):
            series[peer["name"]] = {
                int(k): {"s": s, "peak_gib": peer["peak_mem_gib"].get(k)}
                for k, s in peer["prefill_s"].items()
            }
    for name, points in series.items():
        lengths = sorted(points)
        if not lengths:
            continue
        speed.plot(lengths, [n / points[n]["s"] for n in lengths], marker="o", label=name)
        mem = [(n, points[n].get("peak_gib")) for n in lengths if points[n].get("peak_gib") is not None]
        if mem:
            memory.plot([n for n, _ in mem], [m for _, m in mem], marker="o", label=name)
    for ax, label in ((speed, "prefill tokens/s"), (memory, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    speed.set_yscale("log")
    fig.suptitle(f"{result['config']['preset']} ({result['environment']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
