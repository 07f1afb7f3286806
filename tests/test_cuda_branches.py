"""The CUDA-only branches of training's plumbing, run on CPU with CUDA faked by monkeypatching:
the code paths a GPU user hits first must not wait for a GPU to be tested (the bench's
`torch.cuda.getmachine_name` crash was one such branch)."""
import subprocess
import sys
import types

import pytest
import torch

from unified_tte import distributed
from unified_tte.model import backbones
from unified_tte.train import engine, loop, rng, run_log
from unified_tte.train.recipe import recipe_from_dict


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return monkeypatch


def test_rng_state_saves_and_restores_the_cuda_generator(fake_cuda):
    saved = torch.arange(16, dtype=torch.uint8)
    restored = []
    fake_cuda.setattr(torch.cuda, "get_rng_state", lambda *a, **k: saved.clone())
    fake_cuda.setattr(torch.cuda, "set_rng_state", lambda state, *a, **k: restored.append(state.clone()))
    state = rng.rng_state()
    assert "cuda" in state
    rng.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], saved)
    snap = rng.torch_rng()
    rng.set_torch_rng(snap)
    assert torch.equal(restored[-1], saved)


def test_peak_memory_reads_cuda_max_allocated(fake_cuda):
    fake_cuda.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2 ** 30)
    assert run_log.memory_gb(torch.device("cuda", 0)) == 3.0


def test_precision_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    recipe = recipe_from_dict({"backbone": "tiny", "precision": "auto"})
    assert loop.uses_bf16(recipe, torch.device("cuda", 0))
    assert not loop.uses_bf16(recipe, torch.device("cpu"))
    assert loop.uses_bf16(recipe_from_dict({"backbone": "tiny", "precision": "bf16"}), torch.device("cpu"))


def test_init_distributed_picks_nccl_and_the_local_gpu(fake_cuda):
    calls = {}
    fake_ds = types.SimpleNamespace(init_distributed=lambda **kw: calls.update(kw))
    fake_cuda.setattr(engine, "import_deepspeed", lambda: fake_ds)
    fake_cuda.setattr(torch.cuda, "set_device", lambda index: calls.update(device=index))
    fake_cuda.setattr(torch.distributed, "is_initialized", lambda: False)
    fake_cuda.setattr(torch.distributed, "get_rank", lambda: 1)
    fake_cuda.setattr(torch.distributed, "get_world_size", lambda: 2)
    fake_cuda.setenv("RANK", "1")
    fake_cuda.setenv("WORLD_SIZE", "2")
    fake_cuda.setenv("LOCAL_RANK", "1")
    fake_cuda.setenv("MASTER_ADDR", "10.0.0.1")   # a launcher sets it with RANK
    d = engine.init_distributed()
    assert calls["dist_backend"] == "nccl" and calls["device"] == 1
    assert d.device == torch.device("cuda", 1) and (d.rank, d.world, d.local_rank) == (1, 2, 1)


def test_all_reduce_moves_to_the_gpu_for_nccl(monkeypatch):
    moved = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self: moved.append(True) or self)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.mul_(2))
    assert distributed.all_reduce([1.0, 2.5]) == [2.0, 5.0] and moved == [True]


@pytest.mark.parametrize("installed, expected", [(True, "flash_attention_2"), (False, "sdpa")])
def test_attention_implementation_on_cuda(fake_cuda, installed, expected):
    real = backbones.importlib.util.find_spec
    fake_cuda.setattr(backbones.importlib.util, "find_spec",
                      lambda name, *a: (object() if installed else None) if name == "flash_attn" else real(name, *a))
    assert backbones.attention_implementation() == expected


@pytest.mark.parametrize("left_behind", [{}, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}],
                         ids=["clean environment", "RANK left by a parent's plain launch"])
def test_a_plain_launch_joins_a_one_process_group_without_opening_a_port(left_behind):
    # A free port picked then bound later can be taken by another process in between (EADDRINUSE
    # in CI); a one-process group must not need a port at all. Forbid binding to prove it. A
    # child of a process that made such a group inherits its RANK without MASTER_ADDR: still plain.
    script = (
        "import os, socket\n"
        "def refuse(*a, **k): raise OSError('binding a port is not allowed here')\n"
        "socket.socket.bind = refuse\n"
        "for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'): os.environ.pop(key, None)\n"
        f"os.environ.update({left_behind!r})\n"
        "os.environ['CUDA_VISIBLE_DEVICES'] = ''\n"
        "from unified_tte.distributed import all_reduce\n"
        "from unified_tte.train.engine import init_distributed\n"
        "d = init_distributed()\n"
        "import deepspeed.comm\n"
        "assert (d.rank, d.world) == (0, 1) and deepspeed.comm.is_initialized()\n"
        "assert all_reduce([1.5]) == [1.5]\n"
    )
    pytest.importorskip("deepspeed")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
