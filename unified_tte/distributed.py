"""Ranks of a launch: join the process group torchrun (or the deepspeed launcher) set up in the
environment, or stand alone as the single rank of a plain launch; deal out global batches; and the
few collectives `tte train`, `tte eval` and `tte traces` use. gloo on CPU, NCCL on GPU (each rank
on cuda:LOCAL_RANK).

    torchrun --nproc_per_node 8 -m unified_tte.cli eval RUN_DIR --tasks mmeb_v2 --data-root /data/MMEB-V2
    torchrun --nnodes 2 --node_rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        --nproc_per_node 8 -m unified_tte.cli eval ...          # many nodes: torchrun's rendezvous

    from unified_tte.distributed import init_ranks, my_batches
    ranks = init_ranks()                                # Ranks(rank=0, world=1) when launched plainly
    for b in my_batches(n_batches, ranks): ...          # batches b = rank, rank + world, ...

Work is dealt out by whole global batches, so every batch holds the same items whatever the
number of ranks: one process and N ranks compute bit-identical embeddings and traces. Training
joins through DeepSpeed (train/engine.py init_distributed) and needs a group even alone.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable

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


def launched() -> bool:
    """True when a launcher started this process. A launcher sets RANK with MASTER_ADDR; RANK alone
    is what a plain launch of a one-process group (init_ranks(alone_too=True)) left behind in the
    environment of a parent process (tests, `tte plan`'s workers)."""
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


def launch_rank() -> int:
    """This process's rank as its launcher set it (0 for a plain launch), known before any
    process group is joined: who takes a run folder's lock."""
    return int(os.environ["RANK"]) if launched() else 0


def init_ranks(timeout_s: int = 7200, *, join: Callable[[str], None] | None = None,
               alone_too: bool = False) -> Ranks:
    """Join the launcher's process group (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR), or
    return the single rank of a plain launch (or of a launch of one process).

    Args:
        timeout_s: how long a collective waits for the other ranks (torch's own join).
        join: joins the group, given the backend ("nccl" on GPU, else "gloo"), in place of
            torch.distributed.init_process_group; training passes DeepSpeed's.
        alone_too: on a plain launch, make a one-process group as well (DeepSpeed's engine needs
            one), in memory: no TCP port, which another process could take between picking a
            free port and binding it (EADDRINUSE).
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1
    if world <= 1 and not alone_too:
        return Ranks()
    plain = not launched()
    if plain:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    if plain and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if join is not None:
        join(backend)
    elif not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
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


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_reduce(values: list[float]) -> list[float]:
    """The sum of `values` over the ranks of the process group (the values alone without one)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()
