"""Ranks of a data-parallel job (`tte eval`, `tte traces`) launched by torchrun: join the
process group from the environment, deal out global batches, gather results on rank 0.

    torchrun --nproc_per_node 8 -m unified_tte.cli eval RUN_DIR --tasks mmeb_v2 --data-root /data/MMEB-V2
    torchrun --nnodes 2 --node_rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        --nproc_per_node 8 -m unified_tte.cli eval ...          # many nodes: torchrun's rendezvous

    from unified_tte.data.ranks import init_ranks, my_batches
    ranks = init_ranks()                                # Ranks(rank=0, world=1) when launched plainly
    for b in my_batches(n_batches, ranks): ...          # batches b = rank, rank + world, ...

Work is dealt out by whole global batches, so every batch holds the same items whatever the
number of ranks: one process and N ranks compute bit-identical embeddings and traces. gloo on
CPU, NCCL on GPU (each rank on cuda:LOCAL_RANK). No DeepSpeed needed.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_ranks(timeout_s: int = 7200) -> Ranks:
    """Join the launcher's process group (RANK / WORLD_SIZE / MASTER_ADDR from torchrun), or
    return the single rank of a plain launch."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


def my_batches(n_batches: int, ranks: Ranks) -> range:
    """The global batch indices this rank computes (round robin)."""
    return range(ranks.rank, n_batches, ranks.world)


def gather(obj, ranks: Ranks) -> list | None:
    """Every rank's `obj` on rank 0 (in rank order), None elsewhere."""
    if ranks.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * ranks.world if ranks.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj, ranks: Ranks):
    """Rank 0's `obj` on every rank."""
    if ranks.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()
