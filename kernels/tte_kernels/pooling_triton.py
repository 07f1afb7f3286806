"""Triton pooling: gather the pooled token (or masked mean) and L2-normalise, fused, fwd + bwd.

    from tte_kernels.pooling_triton import pool_triton
    emb = pool_triton(hidden, positions=idx)              # CUDA tensors, or CPU with TRITON_INTERPRET=1
    TRITON_INTERPRET=1 python -m pytest tests/test_kernels_triton.py -q   # the CPU check

Layers as in Liger-Kernel: `_pool_fwd_kernel` / `_pool_bwd_kernel` (Triton), the launchers
`pool_forward` / `pool_backward`, and the autograd.Function `PoolTriton`. Inputs are assumed
validated (tte_kernels.pool does that); this module imports triton at import time. Every launch
runs under `device_guard` (constants.py): on the tensor's GPU, with no CUDA call for CPU tensors.

One program owns one row b and the whole embedding dim (BLOCK_D = next power of two >= D), so
the norm is a register reduction and the row is written once; mean pooling walks T in tiles of
BLOCK_T positions. The gradient of last-token pooling lands in one position per row, so dH
starts as zeros; mean pooling writes every position, so dH starts uninitialised.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import EPS, device_guard

MAX_BLOCK_D = 1 << 16  # beyond this a row no longer fits one program's registers


@triton.jit
def _pool_fwd_kernel(
    H_ptr, H_stride_b, H_stride_t,  # [B, T, D], unit stride over D
    POS_ptr,  # [B] int64, used when not IS_MEAN
    MASK_ptr, MASK_stride_b,  # [B, T] fp32 0/1, used when IS_MEAN
    Y_ptr, Y_stride_b,  # [B, D] fp32 out
    NORM_ptr,  # [B] fp32 out: ||v||, kept for the backward
    T, D, eps,
    IS_MEAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    row = H_ptr + b * H_stride_b
    if IS_MEAN:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        count = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            m = tl.load(MASK_ptr + b * MASK_stride_b + ts, mask=ts < T, other=0.0)
            # Masked-off positions are never loaded, so padding cannot leak NaN into the mean.
            h = tl.load(row + ts[:, None].to(tl.int64) * H_stride_t + d[None, :],
                        mask=(m[:, None] != 0) & d_mask[None, :], other=0.0)
            acc += tl.sum(h.to(tl.float32), axis=0)
            count += m
        v = acc / tl.maximum(tl.sum(count, axis=0), 1.0)
    else:
        p = tl.load(POS_ptr + b)
        v = tl.load(row + p * H_stride_t + d, mask=d_mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(v * v, axis=0))
    tl.store(Y_ptr + b * Y_stride_b + d, v / tl.maximum(norm, eps), mask=d_mask)
    tl.store(NORM_ptr + b, norm)


@triton.jit
def _pool_bwd_kernel(
    DY_ptr, DY_stride_b,  # [B, D] upstream gradient (fp32)
    Y_ptr, Y_stride_b,  # [B, D] forward output
    NORM_ptr,  # [B]
    POS_ptr, MASK_ptr, MASK_stride_b,
    DH_ptr, DH_stride_b, DH_stride_t,  # [B, T, D] in hidden's dtype
    T, D, eps,
    IS_MEAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    dy = tl.load(DY_ptr + b * DY_stride_b + d, mask=d_mask, other=0.0).to(tl.float32)
    y = tl.load(Y_ptr + b * Y_stride_b + d, mask=d_mask, other=0.0)
    norm = tl.load(NORM_ptr + b)
    # y = v / max(||v||, eps): the radial component of dy is removed unless the clamp is active
    # (then y is linear in v), exactly like autograd through F.normalize.
    radial = tl.sum(y * dy, axis=0)
    dv = tl.where(norm > eps, (dy - y * radial) / tl.maximum(norm, eps), dy / eps)
    out = DH_ptr + b * DH_stride_b
    if IS_MEAN:
        count = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            count += tl.load(MASK_ptr + b * MASK_stride_b + ts, mask=ts < T, other=0.0)
        dv = dv / tl.maximum(tl.sum(count, axis=0), 1.0)
        for t0 in range(0, T, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            m = tl.load(MASK_ptr + b * MASK_stride_b + ts, mask=ts < T, other=0.0)
            g = m[:, None] * dv[None, :]
            tl.store(out + ts[:, None].to(tl.int64) * DH_stride_t + d[None, :], g.to(DH_ptr.dtype.element_ty),
                     mask=(ts[:, None] < T) & d_mask[None, :])
    else:
        p = tl.load(POS_ptr + b)
        tl.store(out + p * DH_stride_t + d, dv.to(DH_ptr.dtype.element_ty), mask=d_mask)


def _blocks(D: int) -> tuple[int, int, int]:
    block_d = triton.next_power_of_2(D)
    if block_d > MAX_BLOCK_D:
        raise ValueError(f"hidden dim D={D} is too large for the Triton pooling kernel (max {MAX_BLOCK_D}); "
                         "use backend='chunked'")
    # Keep a [BLOCK_T, BLOCK_D] tile near 8K elements: enough loads in flight, no register spill.
    block_t = max(1, min(64, 8192 // block_d))
    num_warps = 4 if block_d <= 2048 else 8
    return block_t, block_d, num_warps


def pool_forward(hidden: torch.Tensor, positions: torch.Tensor | None, mask: torch.Tensor | None):
    """Launch the forward kernel. Returns (y fp32 [B, D], norm fp32 [B], mask as fp32 or None)."""
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    B, T, D = hidden.shape
    y = torch.empty(B, D, dtype=torch.float32, device=hidden.device)
    norm = torch.empty(B, dtype=torch.float32, device=hidden.device)
    is_mean = mask is not None
    mask_f = mask.to(torch.float32).contiguous() if is_mean else y  # placeholder pointer when unused
    pos = positions.contiguous() if not is_mean else norm
    block_t, block_d, num_warps = _blocks(D)
    with device_guard(hidden):
        _pool_fwd_kernel[(B,)](
            hidden, hidden.stride(0), hidden.stride(1),
            pos, mask_f, mask_f.stride(0) if is_mean else 0,
            y, y.stride(0), norm,
            T, D, EPS,
            IS_MEAN=is_mean, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
        )
    return y, norm, (mask_f if is_mean else None)


def pool_backward(dy, y, norm, positions, mask_f, shape, dtype) -> torch.Tensor:
    """Launch the backward kernel. Returns dH [B, T, D] in hidden's dtype."""
    B, T, D = shape
    is_mean = mask_f is not None
    dy = dy.float().contiguous()
    dh = (torch.empty if is_mean else torch.zeros)(shape, dtype=dtype, device=dy.device)
    block_t, block_d, num_warps = _blocks(D)
    with device_guard(dy):
        _pool_bwd_kernel[(B,)](
            dy, dy.stride(0), y, y.stride(0), norm,
            positions if not is_mean else norm, mask_f if is_mean else y, mask_f.stride(0) if is_mean else 0,
            dh, dh.stride(0), dh.stride(1),
            T, D, EPS,
            IS_MEAN=is_mean, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
        )
    return dh


class PoolTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, positions, mask):
        y, norm, mask_f = pool_forward(hidden, positions, mask)
        ctx.save_for_backward(y, norm, positions, mask_f)
        ctx.shape, ctx.dtype = hidden.shape, hidden.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        y, norm, positions, mask_f = ctx.saved_tensors
        return pool_backward(dy, y, norm, positions, mask_f, ctx.shape, ctx.dtype), None, None


def pool_triton(hidden, positions=None, mask=None) -> torch.Tensor:
    """Triton pooling (inputs assumed valid: call tte_kernels.pool for checked inputs)."""
    return PoolTriton.apply(hidden, positions, mask)
