"""The order of training samples: global batches of one modality (all with an image, or all text-only),
each sorted by length so its micro-batches pad little, in a seeded order that depends only on (seed,
epoch) — so any process count sees the same global batches, and a resumed run the same order.

After prismatic's `SplitModalitySampler` (the Cobra finetune sampler): modalities batched apart, a short
last batch filled with samples from the start of its modality, the batch holding the longest sample
first (an out-of-memory shows at step one, not hours in). Micro-batch j of a global batch goes to rank
j mod world, so the per-rank split is the same micro-batches a single process accumulates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EpochPlan:
    batches: list[list[int]]  # global batches of sample indices
    repeated: int  # samples repeated to fill the last batch of each modality


def plan_epoch(
    lengths: list[int],
    has_image: list[bool],
    global_batch_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
) -> EpochPlan:
    if not lengths:
        raise ValueError("no training samples")
    if len(lengths) != len(has_image):
        raise ValueError("one has_image flag per sample is needed")
    g = torch.Generator().manual_seed(seed + epoch)
    batches: list[list[int]] = []
    repeated = 0
    for modality in (True, False):
        members = torch.tensor([i for i, h in enumerate(has_image) if h == modality], dtype=torch.long)
        if not len(members):
            continue
        order = members[torch.randperm(len(members), generator=g)].tolist()
        short = -len(order) % global_batch_size
        fill = (order * (short // len(order) + 1))[:short]  # tiny datasets: wrap as often as needed
        repeated += short
        order += fill
        for start in range(0, len(order), global_batch_size):
            batch = order[start : start + global_batch_size]
            if group_by_length:
                batch = sorted(batch, key=lambda i: -lengths[i])
            batches.append(batch)
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    longest = max(range(len(shuffled)), key=lambda b: max(lengths[i] for i in shuffled[b]))
    shuffled.insert(0, shuffled.pop(longest))
    return EpochPlan(shuffled, repeated)


def micro_batches(batch: list[int], per_device: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch."""
    if len(batch) % (per_device * world):
        raise ValueError(
            f"the global batch ({len(batch)}) must be a multiple of per-device batch × processes "
            f"({per_device} × {world})"
        )
    chunks = [batch[i : i + per_device] for i in range(0, len(batch), per_device)]
    return chunks[rank::world]
