"""Exact prefix-state cache: snapshots of a model's recurrent state at exact positions of a prompt.

A Mamba model's state after any prefix is a fixed-size snapshot (conv windows and SSM states; the KV of
any attention layers), so a request whose prompt starts with a prefix seen before can resume from the
state after that prefix and prefill only the rest, with the same result as prefilling everything: the
snapshot *is* the state, not an approximation, and it is taken at the exact boundary (never rounded to a
block grid). Snapshots are taken after the image, at the end of every prompt, and at the end of every
finished answer.

A prompt is keyed as the sequence of what it feeds the model: token ids, and the image as one item (its
content digest) where it goes. A lookup returns the longest cached prefix of that sequence. One cache
serves one model (an engine owns it), so the model is part of every key by construction. Memory is
bounded by a byte budget on the model's device with least-recently-used eviction; evicted snapshots may
move to an optional host-memory tier (also LRU) from which a hit is copied back.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mambavl.lm.state import LMState

Item = int | tuple[str, str]  # a token id, or ("image", digest)


def image_item(views: Sequence, size: tuple[int, int], grid: tuple[int, int] | None = None) -> Item:
    """The key item of a prepared image: a digest of the pixels the tower sees (every view, its shape and
    dtype), the original size and the AnyRes grid. Two images hit the same snapshots only when the model
    would see the same input."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(size), grid)).encode())
    for view in views:
        parts = sorted(view.items()) if isinstance(view, dict) else [("", view)]
        for name, t in parts:
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return ("image", h.hexdigest())


@dataclass
class Snapshot:
    """The state after `positions` positions of a prompt (batch of one) and the next-token logits there."""

    state: LMState
    logits: torch.Tensor  # [vocab] fp32
    positions: int  # model positions the prefix covers (an image counts its embedding's length)

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.logits.numel() * self.logits.element_size()

    def to(self, device) -> Snapshot:
        return Snapshot(self.state.to(device), self.logits.to(device), self.positions)


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    hit_positions: int = 0  # positions not prefilled thanks to hits
    insertions: int = 0
    evictions: int = 0  # snapshots dropped from the cache altogether
    demotions: int = 0  # snapshots put in the host tier (evicted from the device's, or too large for it)
    bytes_device: int = 0
    bytes_host: int = 0
    entries: int = 0


@dataclass
class PrefixCache:
    """Snapshots keyed by the exact item sequence of their prefix, LRU within `budget_bytes` on the model's
    device and `host_budget_bytes` in host memory (0: no host tier). Thread-safe."""

    budget_bytes: int
    host_budget_bytes: int = 0
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        if self.budget_bytes < 0 or self.host_budget_bytes < 0:
            raise ValueError("prefix cache budgets must be ≥ 0 bytes")
        self._device: OrderedDict[tuple, Snapshot] = OrderedDict()
        self._host: OrderedDict[tuple, Snapshot] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._device) + len(self._host)

    def lookup(self, items: Sequence[Item], device=None) -> tuple[int, Snapshot] | None:
        """The longest cached prefix of `items`: (how many items it covers, its snapshot, on `device`
        when given), or None. A hit counts as recently used; one in the host tier moves back."""
        items = tuple(items)
        with self._lock:
            self.stats.lookups += 1
            for n in range(len(items), 0, -1):
                key = items[:n]
                snap = self._device.get(key)
                if snap is not None:
                    self._device.move_to_end(key)
                elif key in self._host:
                    snap = self._host.pop(key)
                    self.stats.bytes_host -= snap.nbytes
                    self.stats.entries -= 1
                    # back to the device tier (or, larger than its whole budget, back to the host tier)
                    snap = self._place(key, snap, device) or snap
                if snap is not None:
                    self.stats.hits += 1
                    self.stats.hit_positions += snap.positions
                    return n, (snap.to(device) if device is not None else snap)
            return None

    def insert(self, items: Sequence[Item], snapshot: Snapshot) -> None:
        """Keeps `snapshot` as the state after `items` (replacing an older one of the same key). The state
        is stored as given: pass a copy the caller will not modify."""
        key = tuple(items)
        if not key:
            return
        with self._lock:
            self._drop(key)
            if self._place(key, snapshot, None) is not None:
                self.stats.insertions += 1

    def clear(self) -> None:
        with self._lock:
            self._device.clear()
            self._host.clear()
            self.stats.bytes_device = self.stats.bytes_host = self.stats.entries = 0

    # ---- inside the lock ---------------------------------------------------------------------------------
    def _drop(self, key: tuple) -> None:
        for tier, name in ((self._device, "bytes_device"), (self._host, "bytes_host")):
            old = tier.pop(key, None)
            if old is not None:
                setattr(self.stats, name, getattr(self.stats, name) - old.nbytes)
                self.stats.entries -= 1

    def _place(self, key: tuple, snap: Snapshot, device) -> Snapshot | None:
        """Puts `snap` in the device tier, demoting the least recently used ones to fit; None when it is
        larger than the whole budget (then it goes to the host tier if one can hold it)."""
        size = snap.nbytes
        if size > self.budget_bytes:
            self._to_host(key, snap)
            return None
        while self.stats.bytes_device + size > self.budget_bytes:
            old_key, old = self._device.popitem(last=False)
            self.stats.bytes_device -= old.nbytes
            self.stats.entries -= 1
            self._to_host(old_key, old)
        if device is not None:
            snap = snap.to(device)
        self._device[key] = snap
        self.stats.bytes_device += size
        self.stats.entries += 1
        return snap

    def _to_host(self, key: tuple, snap: Snapshot) -> None:
        size = snap.nbytes
        if size > self.host_budget_bytes:
            self.stats.evictions += 1
            return
        while self.stats.bytes_host + size > self.host_budget_bytes:
            _, old = self._host.popitem(last=False)
            self.stats.bytes_host -= old.nbytes
            self.stats.entries -= 1
            self.stats.evictions += 1
        self._host[key] = snap.to("cpu")
        self.stats.bytes_host += size
        self.stats.entries += 1
        self.stats.demotions += 1
