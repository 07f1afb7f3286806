"""What every implementation of an op must agree on. The reference, the chunked path and the
Triton kernel each read it from here, so a Triton module never imports its reference twin.

    from tte_kernels.constants import EPS, IGNORE_INDEX, device_guard

A leaf: it imports nothing from tte_kernels, so any module of the package may import it.
"""
from __future__ import annotations

import contextlib

import torch

EPS = 1e-12  # F.normalize's default, so all three pooling paths agree on tiny vectors too
IGNORE_INDEX = -100  # label of a padding row, as in torch.nn.functional.cross_entropy


def device_guard(x: torch.Tensor):
    """Where a Triton launch on x must run: under `torch.cuda.device(x.device)` for a CUDA tensor,
    as flash-attention's launchers do (Triton launches on the current device, which need not be
    x's: a tensor on cuda:1 would be read from cuda:0). A CPU tensor (Triton's interpreter) gets a
    no-op, so a machine without CUDA makes no CUDA call."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()
