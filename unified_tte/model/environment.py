"""The environment settings the kernels read, checked before any work (`tte train` and `tte eval`
call this first; `tte doctor` runs it as its first kernel check).

    from unified_tte.model.environment import check_kernel_environment
    check_kernel_environment()          # raises SettingError naming the variable, else None

Without it a bad `TTE_KERNEL_BACKEND` (a typo, or `triton` on a machine without CUDA) is found
only by the first pooling or InfoNCE call: in training after the think stage has run and saved,
in evaluation after the model has loaded.
"""
from __future__ import annotations

import torch
from tte_kernels.dispatch import ENV_INFONCE_CHUNK, ENV_POOL_CHUNK, chunk_from_env, resolve_backend

from ..errors import SettingError


def check_kernel_environment(device: str | torch.device | None = None) -> str:
    """The kernel backend `device` (default: CUDA if available, else CPU) will use under the current
    environment; SettingError naming the variable when TTE_KERNEL_BACKEND, TTE_INFONCE_CHUNK or
    TTE_POOL_CHUNK cannot be used there."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        for name in (ENV_INFONCE_CHUNK, ENV_POOL_CHUNK):
            chunk_from_env(name, None)
        return resolve_backend(None, device)
    except ValueError as exc:
        raise SettingError(f"environment variable {exc}; fix or unset it before running again") from None
