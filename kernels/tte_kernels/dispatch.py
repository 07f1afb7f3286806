"""Backend choice for the tte_kernels ops: `triton`, `chunked` or `ref`.

    from tte_kernels.dispatch import resolve_backend
    resolve_backend(None, torch.device("cpu"))   # -> "chunked" (or $TTE_KERNEL_BACKEND)

Order of precedence: the op's `backend=` argument, then the environment variable
TTE_KERNEL_BACKEND, then the device: Triton on CUDA, the chunked pure-PyTorch path elsewhere.
Triton on CPU tensors is only possible in Triton's interpreter (TRITON_INTERPRET=1 set before
triton is imported), which is how the CPU tests run the kernels.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("triton", "chunked", "ref")
ENV_BACKEND = "TTE_KERNEL_BACKEND"
ENV_INFONCE_CHUNK = "TTE_INFONCE_CHUNK"  # rows of q per step of the chunked InfoNCE
ENV_POOL_CHUNK = "TTE_POOL_CHUNK"  # sequence positions per step of the chunked mean pooling


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (decided when triton decorates them)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # any import failure means "no Triton here", not a crash of the op
        return False
    return True


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Return the backend to run on `device`; raise ValueError if it cannot run there."""
    source = "backend"
    if backend is None or backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip().lower()
        if env and env != "auto":
            backend, source = env, f"${ENV_BACKEND}"
        elif device.type == "cuda" and triton_available():
            return "triton"
        else:
            if device.type == "cuda":
                _warn_once("triton is not importable; tte_kernels falls back to the chunked PyTorch path on CUDA")
            return "chunked"
    if backend not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not a tte_kernels backend; use one of {BACKENDS} (or None/'auto')")
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"{source}='triton' but triton is not importable; install triton or use 'chunked'")
        if device.type != "cuda" and not interpret_mode():
            raise ValueError(
                f"{source}='triton' needs CUDA tensors, got {device.type} tensors; move the inputs to a GPU, "
                "set TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter, "
                "or use backend='chunked'"
            )
    return backend


def chunk_from_env(name: str, given: int | None) -> int | None:
    """`given` if set, else the positive int in $name, else None (the op picks its default)."""
    if given is not None:
        if not isinstance(given, int) or isinstance(given, bool) or given < 1:
            raise ValueError(f"chunk_size must be a positive int, got {given!r}")
        return given
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"${name}={raw!r} must be a positive int (unset it to use the default chunk)")
    return value


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
