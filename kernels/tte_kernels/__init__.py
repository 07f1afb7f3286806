"""tte_kernels: fused pooling and InfoNCE for unified_tte, in Triton with PyTorch twins.

    from tte_kernels import pool, info_nce, pool_ref, info_nce_ref
    emb = pool(hidden, positions=last_idx)          # fp32 [B, D], L2-normalised
    loss = info_nce(q_emb, t_emb, temperature=0.02)  # never holds the B x N score matrix

Backends (backend= argument, else $TTE_KERNEL_BACKEND, else Triton on CUDA / chunked elsewhere):
"triton" (kernels in pooling_triton.py, infonce_triton.py), "chunked" (pure PyTorch, bounded
memory, any device), "ref" (the plain PyTorch definition). See README.md in this folder.
Tests: `pytest tests/test_kernels*.py -q`. Bench: `python -m tte_kernels.bench --help` (it times
itself; the package's benchmarks share unified_tte/tools/measure.py, which this package never
imports).
The package is kernels/tte_kernels/; kernels/ is not a package, so it never shadows Hugging Face's
`kernels` (which transformers imports) when the repo root is on sys.path.
"""
from .constants import IGNORE_INDEX
from .dispatch import BACKENDS, ENV_BACKEND, ENV_INFONCE_CHUNK, ENV_POOL_CHUNK, resolve_backend
from .infonce import info_nce, info_nce_chunked, info_nce_ref
from .pooling import pool, pool_chunked, pool_ref

__all__ = [
    "pool", "info_nce", "pool_ref", "info_nce_ref", "pool_chunked", "info_nce_chunked",
    "resolve_backend", "BACKENDS", "ENV_BACKEND", "ENV_INFONCE_CHUNK", "ENV_POOL_CHUNK", "IGNORE_INDEX",
]
