"""One code path for 1…N processes: `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK, and the same
training code then shards the model with FSDP2 (`fully_shard`) over NCCL (GPUs) or gloo (CPU). Run as a
plain process, it is a world of one and nothing is sharded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_sum(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def setup() -> World:
    """The process's place in the run, from torchrun's environment; initialises the process group."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("MAMBAVL_DEVICE", "") != "cpu"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return World(rank, size, local_rank, device)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(vlm: nn.Module, world: World) -> nn.Module:
    """FSDP2: every LM block its own unit (all-gathered just in time, resharded after), then the rest of
    the model (embeddings, head, projector). A frozen vision tower is not sharded: each process keeps a
    copy and runs it without gradients (no collectives in its forward). Parameters stay fp32 (the master
    weights); bf16 compute comes from autocast, so N processes compute what one does."""
    if not world.distributed:
        return vlm
    from torch.distributed.fsdp import fully_shard

    for block in vlm.lm.layers:
        fully_shard(block)
    frozen_vision = {p for p in vlm.vision.parameters() if not p.requires_grad}
    if not frozen_vision:
        fully_shard(vlm.vision)
    fully_shard(vlm, ignored_params=frozen_vision or None)
    return vlm
