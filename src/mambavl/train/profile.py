"""One training step by kernel: where the time goes (`TrainConfig.profile_step`, `mambavl bench --train
--profile`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def summary(events, rows: int = 40) -> str:
    """The kernels (on a GPU; else the CPU ops) that took the most time, by self time, with their share.
    On a GPU only device events count: an op that launches a kernel also carries the kernel's time, so
    ops and kernels together would count it twice."""
    kernels = [(e, float(e.self_device_time_total)) for e in events if e.device_type != DeviceType.CPU]
    timed = kernels or [(e, float(e.self_cpu_time_total)) for e in events]
    timed = [(e, us) for e, us in timed if us > 0]
    total = sum(us for _, us in timed) or 1.0
    timed.sort(key=lambda pair: -pair[1])
    where = "device (kernels)" if kernels else "CPU"
    lines = [f"{where} self time {total / 1e3:.1f} ms in all; the top {rows}:", ""]
    lines.append(f"{'ms':>9} {'share':>6} {'calls':>6}  name")
    for event, us in timed[:rows]:
        lines.append(f"{us / 1e3:9.2f} {100 * us / total:5.1f}% {event.count:6d}  {event.key[:110]}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def profiled(path: Path, device: torch.device, rows: int = 40):
    """Profiles the block (CPU ops, and CUDA kernels on a GPU) and writes `summary` to `path`."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    path.write_text(summary(prof.key_averages(), rows))
