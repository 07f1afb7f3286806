"""Embedding pooling: pick the last invocation token (or mean over masked tokens) and L2-normalise.

    from tte_kernels import pool
    emb = pool(hidden, positions=last_idx)   # hidden [B, T, D] any float dtype -> fp32 [B, D]
    emb = pool(hidden, mask=invocation_mask)  # mean over masked positions, then normalise

Three implementations, held equal by tests/test_kernels_pool.py and tests/test_kernels_triton.py:
  * `pool_ref`      plain PyTorch, autograd does the backward (the obvious twin);
  * `pool_chunked`  explicit forward/backward that walks T in chunks, so mean pooling never
                    holds an fp32 copy of the whole [B, T, D] hidden state (runs anywhere);
  * Triton          pooling_triton.py, one program per row, fused gather/mean + normalise.
`pool` validates, then dispatches (see dispatch.py): `backend=` or $TTE_KERNEL_BACKEND, else
Triton on CUDA and chunked elsewhere. $TTE_POOL_CHUNK sets the chunk of the chunked path.

Normalisation follows torch.nn.functional.normalize: y = v / max(||v||, 1e-12), so a row with
nothing pooled (an all-zero mask, i.e. a padding row) gives a zero vector and a zero gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_pool
from .constants import EPS
from .dispatch import ENV_POOL_CHUNK, chunk_from_env, resolve_backend

DEFAULT_POOL_CHUNK = 256


def pool_ref(hidden: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             upcast: bool = True) -> torch.Tensor:
    """Plain PyTorch pooling; fp32 [B, D] out. upcast=False computes in hidden's dtype (the
    low-precision baseline of the error budget), then returns fp32."""
    h = hidden.float() if upcast else hidden
    B = h.shape[0]
    if positions is not None:
        v = h[torch.arange(B, device=h.device), positions]
    else:
        m = mask.bool()
        # where, not multiply: a NaN in a padding position must not leak through 0 * NaN.
        v = torch.where(m[..., None], h, torch.zeros((), dtype=h.dtype, device=h.device)).sum(1)
        v = v / m.sum(1, keepdim=True).clamp_min(1).to(h.dtype)
    # 1e-12 underflows to 0 in float16 (0 / 0 on a padding row): clamp at the smallest normal.
    return F.normalize(v, dim=-1, eps=max(EPS, torch.finfo(v.dtype).tiny)).float()


class PoolChunked(torch.autograd.Function):
    """Pooling with a hand-written backward that touches T in chunks of `chunk` positions."""

    @staticmethod
    def forward(ctx, hidden, positions, mask, chunk):
        B, T, D = hidden.shape
        if positions is not None:
            v = hidden[torch.arange(B, device=hidden.device), positions].float()
            count = None
        else:
            v = torch.zeros(B, D, dtype=torch.float32, device=hidden.device)
            zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
            for t0 in range(0, T, chunk):
                part = torch.where(mask[:, t0:t0 + chunk, None], hidden[:, t0:t0 + chunk], zero)
                v += part.sum(1, dtype=torch.float32)  # [B, chunk, D] at most, never [B, T, D] in fp32
            count = mask.sum(1).clamp_min(1).float()  # [B]
            v /= count[:, None]
        norm = v.norm(dim=1)  # [B]
        y = v / norm.clamp_min(EPS)[:, None]
        ctx.save_for_backward(y, norm, positions, mask, count)
        ctx.shape, ctx.dtype, ctx.chunk = hidden.shape, hidden.dtype, chunk
        return y

    @staticmethod
    def backward(ctx, dy):
        y, norm, positions, mask, count = ctx.saved_tensors
        B, T, D = ctx.shape
        dy = dy.float()
        # d/dv of v / max(||v||, eps): project out the radial part, unless the clamp is active.
        radial = (y * dy).sum(1, keepdim=True)
        dv = torch.where((norm > EPS)[:, None], (dy - y * radial) / norm.clamp_min(EPS)[:, None], dy / EPS)
        if positions is not None:
            dh = torch.zeros(ctx.shape, dtype=ctx.dtype, device=dy.device)
            dh[torch.arange(B, device=dy.device), positions] = dv.to(ctx.dtype)
        else:
            dv = dv / count[:, None]
            dh = torch.empty(ctx.shape, dtype=ctx.dtype, device=dy.device)
            for t0 in range(0, T, ctx.chunk):
                m = mask[:, t0:t0 + ctx.chunk, None].to(torch.float32)
                dh[:, t0:t0 + ctx.chunk] = (m * dv[:, None, :]).to(ctx.dtype)
        return dh, None, None, None


def pool_chunked(hidden, positions=None, mask=None, chunk_size: int | None = None) -> torch.Tensor:
    """Chunked pure-PyTorch pooling (inputs assumed valid: call `pool` for checked inputs)."""
    chunk = chunk_size or DEFAULT_POOL_CHUNK
    return PoolChunked.apply(hidden, positions, mask, chunk)


def pool(hidden: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
         backend: str | None = None, *, chunk_size: int | None = None, checked: bool = True) -> torch.Tensor:
    """Pool and L2-normalise final-layer hidden states into embeddings.

    Args:
        hidden: [B, T, D] float32, bfloat16 or float16.
        positions: LongTensor [B], index into T of the pooled token (negative counts from the end).
        mask: [B, T] bool or 0/1; mean over the set positions. Exactly one of positions / mask.
        backend: "triton", "chunked", "ref" or None (= $TTE_KERNEL_BACKEND, else by device).
        chunk_size: positions of T per step of the chunked path (default $TTE_POOL_CHUNK or 256).
        checked: False skips the validation of shapes, dtypes and indices, for a caller that
            built them itself (the model's embed step, where the checks cost about as much as a
            decode step's attention on a small model); positions must then lie in [0, T) and a
            mask be bool. Finiteness is still checked, on the result: the same error for a NaN
            or Inf at a pooled position.

    Returns:
        fp32 [B, D], unit L2 norm per row (zero for a row with nothing pooled); differentiable
        with respect to hidden.
    """
    if checked:
        positions, mask = check_pool(hidden, positions, mask)
    chunk = chunk_from_env(ENV_POOL_CHUNK, chunk_size)
    name = resolve_backend(backend, hidden.device)
    if name == "ref":
        out = pool_ref(hidden, positions, mask)
    elif name == "chunked":
        out = pool_chunked(hidden, positions, mask, chunk)
    else:
        from .pooling_triton import pool_triton  # lazy: the other paths must work without triton

        out = pool_triton(hidden, positions, mask)
    if not checked and not bool(torch.isfinite(out).all()):
        where = "a pooled position" if positions is not None else "a position where mask is set"
        raise ValueError(f"hidden has NaN or Inf at {where}")
    return out
