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
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mambavl.lm.state import LMState

Item = int | tuple[str, str]  # a token id, or ("image", digest)


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


def _encode(item: Item) -> bytes:
    """One item as bytes, prefix-free (a token never encodes like an image or like part of another item)."""
    if isinstance(item, tuple):
        return b"i" + item[1].encode()
    return b"t" + int(item).to_bytes(8, "little", signed=True)


def _prefix_digests(items: Sequence[Item], lengths) -> dict[int, bytes]:
    """The digest of items[:n] for every n in `lengths`, in one pass over the items."""
    h = hashlib.blake2b(digest_size=16)
    out = {}
    for n, item in enumerate(items, 1):
        h.update(_encode(item))
        if n in lengths:
            out[n] = h.digest()
    return out


@dataclass
class _Entry:
    items: tuple  # the exact prefix (compared on a hit, so a digest collision can never resume wrongly)
    snapshot: Snapshot


@dataclass
class PrefixCache:
    """Snapshots keyed by the exact item sequence of their prefix, LRU within `budget_bytes` on the model's
    device and `host_budget_bytes` in host memory (0: no host tier). Thread-safe.

    A lookup costs one pass over the prompt's items and one probe per distinct cached prefix length
    (entries are indexed by their length and the digest of their items), whatever the prompt's length."""

    budget_bytes: int
    host_budget_bytes: int = 0
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        if self.budget_bytes < 0 or self.host_budget_bytes < 0:
            raise ValueError("prefix cache budgets must be ≥ 0 bytes")
        self._device: OrderedDict[tuple[int, bytes], _Entry] = OrderedDict()
        self._host: OrderedDict[tuple[int, bytes], _Entry] = OrderedDict()
        self._lengths: Counter[int] = Counter()  # entries (both tiers) by prefix length
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._device) + len(self._host)

    def lookup(self, items: Sequence[Item], device=None) -> tuple[int, Snapshot] | None:
        """The longest cached prefix of `items`: (how many items it covers, its snapshot, on `device`
        when given), or None. A hit counts as recently used; one in the host tier moves back."""
        items = tuple(items)
        with self._lock:
            self.stats.lookups += 1
            lengths = sorted((n for n in self._lengths if n <= len(items)), reverse=True)
            digests = _prefix_digests(items, set(lengths))
            for n in lengths:
                key = (n, digests[n])
                entry = self._device.get(key) or self._host.get(key)
                if entry is None or entry.items != items[:n]:
                    continue
                if key in self._device:
                    self._device.move_to_end(key)
                    snap = entry.snapshot
                else:  # back to the device tier (or, larger than its whole budget, to the host tier again)
                    self._remove(self._host, key, "bytes_host")
                    placed = self._place(key, entry, device)
                    snap = placed.snapshot if placed is not None else entry.snapshot
                self.stats.hits += 1
                self.stats.hit_positions += snap.positions
                return n, (snap.to(device) if device is not None else snap)
            return None

    def insert(self, items: Sequence[Item], snapshot: Snapshot) -> None:
        """Keeps `snapshot` as the state after `items` (replacing an older one of the same key). The state
        is stored as given: pass a copy the caller will not modify."""
        items = tuple(items)
        if not items:
            return
        key = (len(items), _prefix_digests(items, {len(items)})[len(items)])
        with self._lock:
            self._remove(self._device, key, "bytes_device")
            self._remove(self._host, key, "bytes_host")
            if self._place(key, _Entry(items, snapshot), None) is not None:
                self.stats.insertions += 1

    def clear(self) -> None:
        with self._lock:
            self._device.clear()
            self._host.clear()
            self._lengths.clear()
            self.stats.bytes_device = self.stats.bytes_host = self.stats.entries = 0

    # ---- inside the lock ---------------------------------------------------------------------------------
    def _add(self, tier: OrderedDict, key: tuple, entry: _Entry, counter: str) -> None:
        tier[key] = entry
        setattr(self.stats, counter, getattr(self.stats, counter) + entry.snapshot.nbytes)
        self._lengths[key[0]] += 1
        self.stats.entries += 1

    def _remove(self, tier: OrderedDict, key: tuple, counter: str) -> _Entry | None:
        entry = tier.pop(key, None)
        if entry is not None:
            setattr(self.stats, counter, getattr(self.stats, counter) - entry.snapshot.nbytes)
            self._lengths[key[0]] -= 1
            if not self._lengths[key[0]]:
                del self._lengths[key[0]]
            self.stats.entries -= 1
        return entry

    def _place(self, key: tuple, entry: _Entry, device) -> _Entry | None:
        """Puts `entry` in the device tier, demoting the least recently used ones to fit; None when it is
        larger than the whole budget (then it goes to the host tier if that can hold it)."""
        size = entry.snapshot.nbytes
        if size > self.budget_bytes:
            self._to_host(key, entry)
            return None
        while self.stats.bytes_device + size > self.budget_bytes:
            old_key = next(iter(self._device))
            self._to_host(old_key, self._remove(self._device, old_key, "bytes_device"))
        if device is not None:
            entry = _Entry(entry.items, entry.snapshot.to(device))
        self._add(self._device, key, entry, "bytes_device")
        return entry

    def _to_host(self, key: tuple, entry: _Entry) -> None:
        size = entry.snapshot.nbytes
        if size > self.host_budget_bytes:
            self.stats.evictions += 1
            return
        while self.stats.bytes_host + size > self.host_budget_bytes:
            self._remove(self._host, next(iter(self._host)), "bytes_host")
            self.stats.evictions += 1
        self._add(self._host, key, _Entry(entry.items, entry.snapshot.to("cpu")), "bytes_host")
        self.stats.demotions += 1
