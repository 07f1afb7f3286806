"""Triton InfoNCE: tiled scores, online log-sum-exp, recomputing backward (FlashAttention / Inf-CL).

    from tte_kernels.infonce_triton import info_nce_triton
    loss = info_nce_triton(q, t, labels, tau)   # CUDA tensors, or CPU with TRITON_INTERPRET=1
    TRITON_INTERPRET=1 python -m pytest tests/test_kernels_triton.py -q   # the CPU check

Layers as in Liger-Kernel: four kernels, the launchers `info_nce_forward` / `info_nce_backward`,
and the autograd.Function `InfoNCETriton`. Inputs are assumed validated (tte_kernels.info_nce
does that); tau is a 0-d fp32 device tensor, read inside the kernels so there is no host sync.
Every launch runs under `device_guard` (constants.py): on q's GPU, no CUDA call for CPU tensors.

Kernels (s = q t^T / tau is only ever a [BLOCK_M, BLOCK_N] tile in registers):
  _row_lse_kernel   one program per BLOCK_M rows of q: walks all column tiles with an online
                    max / sum-exp and picks the positive's logit. Writes lse_row[B], pos[B].
  _col_lse_kernel   (symmetric only) the same per BLOCK_N columns over the kept rows: lse_col[N].
  _dq_kernel        one program per row block: recomputes each tile, forms G = dL/ds, adds
                    G t / tau into its own rows of dq, and sums G * s for the tau gradient.
  _dt_kernel        one program per column block: recomputes each tile, adds G^T q / tau.
Splitting dq and dt into two kernels recomputes the scores once more, but each program owns the
rows it writes: no atomics, so the gradients are deterministic.

D (1536 for Qwen2-VL-2B) is too wide to keep a row block of q or of dq in registers, so the
dot products walk D in BLOCK_K slices and dq / dt are accumulated in an fp32 workspace in global
memory, each program reading and writing only its own rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import IGNORE_INDEX, device_guard
from .dispatch import interpret_mode


@triton.jit
def _score_tile(Q_ptr, Q_stride, T_ptr, T_stride, rows, cols, row_mask, col_mask, D,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """<q_rows, t_cols> as a [BLOCK_M, BLOCK_N] fp32 tile (no temperature)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    q_base = Q_ptr + rows[:, None].to(tl.int64) * Q_stride
    t_base = T_ptr + cols[:, None].to(tl.int64) * T_stride
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        q = tl.load(q_base + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        t = tl.load(t_base + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            t = t.to(tl.float32)
        acc = tl.dot(q, tl.trans(t), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _row_lse_kernel(
    Q_ptr, Q_stride, T_ptr, T_stride, LABEL_ptr, TAU_ptr,
    LSE_ptr, POS_ptr,  # [B] fp32 out
    B, N, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    label = tl.load(LABEL_ptr + rows, mask=row_mask, other=-1)
    inv_tau = 1.0 / tl.load(TAU_ptr)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        s = _score_tile(Q_ptr, Q_stride, T_ptr, T_stride, rows, cols, row_mask, col_mask, D,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION) * inv_tau
        s = tl.where(col_mask[None, :], s, float("-inf"))
        pos += tl.sum(tl.where(cols[None, :] == label[:, None], s, 0.0), axis=1)
        # Every tile holds >= 1 real column, so m_new is finite and alpha = exp(-inf) = 0 at first.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(LSE_ptr + rows, m_i + tl.log(l_i), mask=row_mask)
    tl.store(POS_ptr + rows, pos, mask=row_mask)


@triton.jit
def _col_lse_kernel(
    Q_ptr, Q_stride, T_ptr, T_stride, LABEL_ptr, TAU_ptr,
    LSE_ptr,  # [N] fp32 out
    B, N, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    inv_tau = 1.0 / tl.load(TAU_ptr)
    m_j = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_j = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < B
        label = tl.load(LABEL_ptr + rows, mask=row_mask, other=-100)
        kept = row_mask & (label != -100)  # IGNORE_INDEX: padding queries are not in the t->q softmax
        s = _score_tile(Q_ptr, Q_stride, T_ptr, T_stride, rows, cols, row_mask, col_mask, D,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION) * inv_tau
        s = tl.where(kept[:, None], s, float("-inf"))
        # A tile may hold no kept row: then the max stays -inf, and shifting by 0 keeps exp() at 0.
        m_new = tl.maximum(m_j, tl.max(s, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_j = l_j * tl.exp(m_j - shift) + tl.sum(tl.exp(s - shift[None, :]), axis=0)
        m_j = m_new
    tl.store(LSE_ptr + cols, m_j + tl.log(l_j), mask=col_mask)


@triton.jit
def _grad_tile(s, rows, cols, row_mask, col_mask, LABEL_ptr, LSE_ROW_ptr, LSE_COL_ptr, COUNT_ptr,
               w_qt, w_tq, SYMMETRIC: tl.constexpr):
    """G = dL/ds for one tile of logits s (rows/cols outside the problem give 0)."""
    label = tl.load(LABEL_ptr + rows, mask=row_mask, other=-100)
    kept = row_mask & (label != -100)
    lse_row = tl.load(LSE_ROW_ptr + rows, mask=row_mask, other=0.0)
    hit = cols[None, :] == label[:, None]
    g = w_qt * tl.exp(s - lse_row[:, None])
    if SYMMETRIC:
        lse_col = tl.load(LSE_COL_ptr + cols, mask=col_mask, other=0.0)
        count = tl.load(COUNT_ptr + cols, mask=col_mask, other=0.0)
        g += w_tq * count[None, :] * tl.exp(s - lse_col[None, :])
    g = tl.where(hit, g - (w_qt + w_tq), g)
    return tl.where(kept[:, None] & col_mask[None, :], g, 0.0)


@triton.jit
def _dq_kernel(
    Q_ptr, Q_stride, T_ptr, T_stride, LABEL_ptr, TAU_ptr, COEF_ptr,
    LSE_ROW_ptr, LSE_COL_ptr, COUNT_ptr,
    DQ_ptr, DQ_stride,  # [B, D] fp32 workspace, zero on entry
    GS_ptr,  # [B] fp32 out: sum_j G_ij s_ij per row (tau gradient)
    B, N, D,
    SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    inv_tau = 1.0 / tl.load(TAU_ptr)
    w_qt = tl.load(COEF_ptr)  # upstream grad / kept rows, halved when symmetric
    w_tq = tl.load(COEF_ptr + 1)
    gs = tl.zeros([BLOCK_M], dtype=tl.float32)
    dq_base = DQ_ptr + rows[:, None].to(tl.int64) * DQ_stride
    t_elem = T_ptr.dtype.element_ty
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        s = _score_tile(Q_ptr, Q_stride, T_ptr, T_stride, rows, cols, row_mask, col_mask, D,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION) * inv_tau
        g = _grad_tile(s, rows, cols, row_mask, col_mask, LABEL_ptr, LSE_ROW_ptr, LSE_COL_ptr, COUNT_ptr,
                       w_qt, w_tq, SYMMETRIC)
        gs += tl.sum(g * s, axis=1)
        # Half inputs: G goes to the tensor cores in the input dtype, as FlashAttention does with P.
        g_op = g if UPCAST else g.to(t_elem)
        t_base = T_ptr + cols[:, None].to(tl.int64) * T_stride
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < D
            t = tl.load(t_base + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                t = t.to(tl.float32)
            upd = tl.dot(g_op, t, input_precision=PRECISION) * inv_tau
            ptrs = dq_base + ks[None, :]
            io_mask = row_mask[:, None] & k_mask[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=io_mask, other=0.0) + upd, mask=io_mask)
        # The next column tile re-reads these dq rows, possibly from other threads of this program.
        tl.debug_barrier()
    tl.store(GS_ptr + rows, gs, mask=row_mask)


@triton.jit
def _dt_kernel(
    Q_ptr, Q_stride, T_ptr, T_stride, LABEL_ptr, TAU_ptr, COEF_ptr,
    LSE_ROW_ptr, LSE_COL_ptr, COUNT_ptr,
    DT_ptr, DT_stride,  # [N, D] fp32 workspace, zero on entry
    B, N, D,
    SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    inv_tau = 1.0 / tl.load(TAU_ptr)
    w_qt = tl.load(COEF_ptr)
    w_tq = tl.load(COEF_ptr + 1)
    dt_base = DT_ptr + cols[:, None].to(tl.int64) * DT_stride
    q_elem = Q_ptr.dtype.element_ty
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < B
        s = _score_tile(Q_ptr, Q_stride, T_ptr, T_stride, rows, cols, row_mask, col_mask, D,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION) * inv_tau
        g = _grad_tile(s, rows, cols, row_mask, col_mask, LABEL_ptr, LSE_ROW_ptr, LSE_COL_ptr, COUNT_ptr,
                       w_qt, w_tq, SYMMETRIC)
        g_t = tl.trans(g if UPCAST else g.to(q_elem))  # [BLOCK_N, BLOCK_M]
        q_base = Q_ptr + rows[:, None].to(tl.int64) * Q_stride
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < D
            q = tl.load(q_base + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            upd = tl.dot(g_t, q, input_precision=PRECISION) * inv_tau
            ptrs = dt_base + ks[None, :]
            io_mask = col_mask[:, None] & k_mask[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=io_mask, other=0.0) + upd, mask=io_mask)
        tl.debug_barrier()


def _config(dtype: torch.dtype, block_m=None, block_n=None, block_k=None) -> dict:
    """Block sizes and dot settings. fp32 uses IEEE dots so it matches torch's fp32 matmul (TF32
    would miss the 1e-5 tolerance); Triton's interpreter multiplies bf16 wrongly, so there the
    operands are upcast to fp32 first (on a GPU bf16 goes to the tensor cores as is)."""
    upcast = dtype == torch.float32 or (dtype == torch.bfloat16 and interpret_mode())
    return dict(
        BLOCK_M=block_m or 64, BLOCK_N=block_n or 64, BLOCK_K=block_k or (32 if dtype == torch.float32 else 64),
        UPCAST=upcast, PRECISION="ieee" if upcast else "tf32",
    )


def info_nce_forward(q, t, labels, tau, symmetric, **blocks):
    """Launch the forward kernels. Returns (lse_row [B], pos [B], lse_col [N] or None), fp32."""
    B, D = q.shape
    N = t.shape[0]
    cfg = _config(q.dtype, **blocks)
    lse_row = torch.empty(B, dtype=torch.float32, device=q.device)
    pos = torch.empty(B, dtype=torch.float32, device=q.device)
    lse_col = torch.empty(N, dtype=torch.float32, device=q.device) if symmetric else None
    with device_guard(q):
        _row_lse_kernel[(triton.cdiv(B, cfg["BLOCK_M"]),)](
            q, q.stride(0), t, t.stride(0), labels, tau, lse_row, pos, B, N, D, **cfg)
        if symmetric:
            _col_lse_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
                q, q.stride(0), t, t.stride(0), labels, tau, lse_col, B, N, D, **cfg)
    return lse_row, pos, lse_col


def info_nce_backward(q, t, labels, tau, lse_row, lse_col, count, coef, symmetric, needs, **blocks):
    """Launch the backward kernels. coef = [w_qt, w_tq] already times the upstream gradient.
    Returns (dq fp32 [B, D] or None, dt fp32 [N, D] or None, sum G*s per row [B] or None)."""
    need_dq, need_dt, need_dtau = needs
    B, D = q.shape
    N = t.shape[0]
    cfg = _config(q.dtype, **blocks)
    lse_col = lse_row if lse_col is None else lse_col  # placeholder pointers when not symmetric
    count = lse_row if count is None else count
    dq = gs = dt = None
    if need_dq or need_dtau:
        dq = torch.zeros(B, D, dtype=torch.float32, device=q.device)
        gs = torch.empty(B, dtype=torch.float32, device=q.device)
    if need_dt:
        dt = torch.zeros(N, D, dtype=torch.float32, device=q.device)
    with device_guard(q):
        if dq is not None:
            _dq_kernel[(triton.cdiv(B, cfg["BLOCK_M"]),)](
                q, q.stride(0), t, t.stride(0), labels, tau, coef, lse_row, lse_col, count,
                dq, dq.stride(0), gs, B, N, D, SYMMETRIC=symmetric, **cfg)
        if dt is not None:
            _dt_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
                q, q.stride(0), t, t.stride(0), labels, tau, coef, lse_row, lse_col, count,
                dt, dt.stride(0), B, N, D, SYMMETRIC=symmetric, **cfg)
    return (dq if need_dq else None), dt, (gs if need_dtau else None)


class InfoNCETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, t, tau, labels, symmetric, n_valid, needs, blocks):
        q, t = q.contiguous(), t.contiguous()
        labels = labels.contiguous()
        lse_row, pos, lse_col = info_nce_forward(q, t, labels, tau, symmetric, **blocks)
        keep = (labels != IGNORE_INDEX).float()
        loss = (keep * (lse_row - pos)).sum() / n_valid  # O(B) epilogue on the host side
        count = None
        if symmetric:
            lab = labels.clamp_min(0)
            loss_tq = (keep * (lse_col[lab] - pos)).sum() / n_valid
            loss = (loss + loss_tq) / 2
            count = torch.bincount(lab[labels != IGNORE_INDEX], minlength=t.shape[0]).float()
        ctx.save_for_backward(q, t, tau, labels, lse_row, lse_col, count)
        ctx.symmetric, ctx.n_valid, ctx.needs, ctx.blocks = symmetric, n_valid, needs, blocks
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        q, t, tau, labels, lse_row, lse_col, count = ctx.saved_tensors
        w = grad_loss.float() / ctx.n_valid
        coef = torch.stack([w / 2, w / 2]) if ctx.symmetric else torch.stack([w, torch.zeros_like(w)])
        dq, dt, gs = info_nce_backward(q, t, labels, tau, lse_row, lse_col, count, coef.contiguous(),
                                       ctx.symmetric, ctx.needs, **ctx.blocks)
        dtau = -(gs.sum() / tau) if gs is not None else None  # s = x / tau, so ds/dtau = -s / tau
        return (None if dq is None else dq.to(q.dtype), None if dt is None else dt.to(t.dtype),
                dtau, None, None, None, None, None)


def info_nce_triton(q, t, labels, tau, symmetric=False, n_valid=None, *, block_m=None, block_n=None,
                    block_k=None) -> torch.Tensor:
    """Triton InfoNCE (inputs assumed valid: call tte_kernels.info_nce for checked inputs).
    tau: 0-d fp32 tensor on q's device (may require grad); labels: int64 [B], -100 = ignored."""
    if n_valid is None:
        n_valid = int((labels != IGNORE_INDEX).sum())
    enabled = torch.is_grad_enabled()
    needs = (enabled and q.requires_grad, enabled and t.requires_grad, enabled and tau.requires_grad)
    blocks = dict(block_m=block_m, block_n=block_n, block_k=block_k)
    return InfoNCETriton.apply(q, t, tau, labels, symmetric, n_valid, needs, blocks)
