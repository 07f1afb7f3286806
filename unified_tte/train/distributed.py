"""Processes: join the launcher's process group (torchrun, the deepspeed launcher, or one plain
process), and the few collectives the trainer needs. gloo on CPU, NCCL on GPU.

    from unified_tte.train.distributed import init_distributed
    d = init_distributed()      # Dist(rank, world, local_rank, device)
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch

from .. import console
from ..errors import MissingExtra, RunError


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def setup_environment() -> None:
    """Before DeepSpeed is imported: pick its CPU accelerator where there is no GPU (every command
    already did, console.quiet_third_party; this is for the library used without the CLI)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices DeepSpeed triggers inside torch / transformers on every step.
    for pattern in (r"`torch\.distributed\.\w+` is deprecated", r"`is_gradient_checkpointing` is deprecated"):
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)


def require_deepspeed() -> None:
    """Fail fast, before any data or model work, when the [train] extra is not installed."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise MissingExtra("train", "deepspeed", "training (tte train)")


def import_deepspeed():
    setup_environment()
    try:
        import deepspeed
    except ImportError as e:
        raise MissingExtra("train", "deepspeed", "training (tte train)") from e
    except Exception as e:  # noqa: BLE001 - a broken install: its own error, with advice
        raise RunError(f"DeepSpeed failed to import ({type(e).__name__}: {e}). Reinstall it with "
                       "`pip install 'unified_tte[train]'`; on a machine without a GPU set "
                       "DS_ACCELERATOR=cpu.") from e
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def _launched() -> bool:
    # A launcher sets RANK with MASTER_ADDR; RANK alone is what a plain launch of init_distributed
    # left behind in the environment of a parent process (tests, `tte plan`'s workers).
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


def launch_rank() -> int:
    """This process's rank as its launcher set it (0 for a plain launch), known before any
    process group is joined: who takes the run folder's lock."""
    return int(os.environ["RANK"]) if _launched() else 0


def init_distributed() -> Dist:
    """Join the process group the launcher set up (torchrun / deepspeed set RANK, WORLD_SIZE, ...),
    or make a one-process group when launched plainly."""
    deepspeed = import_deepspeed()
    import torch.distributed as dist

    plain_launch = not _launched()
    if plain_launch:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    if plain_launch and not dist.is_initialized():
        # A one-process group needs no rendezvous: an in-memory store instead of a TCP port, which
        # another process could take between picking a free port and binding it (EADDRINUSE).
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not dist.is_initialized() or not deepspeed.comm.is_initialized():
        with console.quiet_stdout():   # it prints "DeepSpeed ... built successfully" per op it loads
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
