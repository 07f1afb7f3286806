"""InfoNCE over query / target embeddings without the B x N wall.

    from tte_kernels import info_nce
    loss = info_nce(q, t)                                  # q [B, D], t [B, D], labels = arange(B)
    loss = info_nce(q, torch.cat([t, hard_neg]), labels)   # explicit hard negatives: N = B + H
    loss = info_nce(q, pos_neg_pairs, layout="interleaved")   # VLM2Vec's [pos_0, neg_0, pos_1, ...]
    loss = info_nce(q, t_all_ranks, labels + rank * B)     # negatives gathered from other ranks
    loss = info_nce(q, t, temperature=log_tau.exp(), symmetric=True)   # learnable tau, CLIP-style

Loss (mean over the rows whose label is not -100):
    s_ij = <q_i, t_j> / tau,   L_qt = mean_i [ logsumexp_j s_ij - s_i,l_i ]
    symmetric (N == B):        L_tq = mean_i [ logsumexp_k s_k,l_i - s_i,l_i ]   (k over kept rows)
                               L = (L_qt + L_tq) / 2
q and t are used as given (normalise them first, e.g. with tte_kernels.pool).

Three implementations, held equal by tests/test_kernels_infonce.py and tests/test_kernels_triton.py:
  * `info_nce_ref`      q @ t.T then cross-entropy, as in VLM2Vec: holds B x N scores and grads;
  * `info_nce_chunked`  pure PyTorch, `chunk` rows of q at a time: each step holds chunk x N
                        scores, and the gradients are computed in the same pass (every row's
                        log-sum-exp is complete inside its chunk), so fwd + bwd costs the same
                        three matmuls as the reference; memory O(chunk * N + (B + N) * D);
  * Triton              infonce_triton.py: online log-sum-exp over tiles, backward recomputes
                        tiles; the B x N matrix never reaches global memory.
`info_nce` validates, then dispatches (dispatch.py). $TTE_INFONCE_CHUNK or chunk_size= sets the
chunk; by default it is sized so a step holds about 8M scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_info_nce
from .constants import IGNORE_INDEX
from .dispatch import ENV_INFONCE_CHUNK, chunk_from_env, resolve_backend

SCORES_PER_STEP = 1 << 23  # default chunk: ~32 MiB of fp32 scores per step, whatever N is


def info_nce_ref(q: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                 temperature: float | torch.Tensor = 0.02, symmetric: bool = False,
                 upcast: bool = True) -> torch.Tensor:
    """The plain loss: full score matrix, F.cross_entropy, autograd. upcast=False computes in the
    inputs' dtype (the low-precision baseline of the error budget). Returns a fp32 scalar."""
    if upcast:
        q, t = q.float(), t.float()
    B = q.shape[0]
    if labels is None:
        labels = torch.arange(B, device=q.device)
    logits = (q @ t.T) / temperature  # [B, N]
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    if symmetric:
        valid = labels != IGNORE_INDEX
        kept = logits if bool(valid.all()) else logits[valid]  # ignored rows leave both directions
        lv = labels[valid]
        loss_tq = (torch.logsumexp(kept, dim=0)[lv] - kept[torch.arange(lv.numel(), device=q.device), lv]).mean()
        loss = (loss + loss_tq) / 2
    return loss.float()


def default_chunk(N: int) -> int:
    return max(16, min(8192, SCORES_PER_STEP // max(N, 1)))


def _column_lse(qf, tf, valid, inv_tau, chunk):
    """logsumexp over kept rows of every column of s, online across row chunks. [N] fp32."""
    B, N = qf.shape[0], tf.shape[0]
    m = torch.full((N,), float("-inf"), device=qf.device)
    acc = torch.zeros(N, device=qf.device)
    for r0 in range(0, B, chunk):
        s = torch.mm(qf[r0:r0 + chunk], tf.T).mul_(inv_tau)
        s.masked_fill_(~valid[r0:r0 + chunk, None], float("-inf"))
        m_new = torch.maximum(m, s.amax(0))
        # A column with no kept row yet keeps max -inf; shift by 0 there so exp() gives 0, not NaN.
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        acc = acc * torch.exp(m - shift) + s.sub_(shift).exp_().sum(0)
        m = m_new
    return m + torch.log(acc)


class InfoNCEChunked(torch.autograd.Function):
    """Chunked InfoNCE; the gradients are produced by the forward pass and scaled in backward.

    Every chunk of rows sees all N columns, so its row log-sum-exp is exact and its gradient
    rows G = dL/ds are final at once: dq_chunk = G t / tau, dt += G^T q_chunk / tau. That is the
    reference's three matmuls, in O(chunk * N) memory. The symmetric loss first needs each
    column's log-sum-exp over all rows: one more pass (one more matmul) computes it online.
    """

    @staticmethod
    def forward(ctx, q, t, tau, labels, symmetric, n_valid, chunk, needs):
        need_dq, need_dt, need_dtau = needs
        need_any = need_dq or need_dt or need_dtau
        qf, tf = q.float(), t.float()  # no copy for fp32; half inputs are computed in fp32 here
        B, N = qf.shape[0], tf.shape[0]
        inv_tau = 1.0 / float(tau)  # host float: matmul alpha wants one (a sync on GPU; fallback path)
        valid = labels != IGNORE_INDEX
        lab = labels.clamp_min(0)  # ignored rows index column 0 harmlessly; their weight is 0
        keep = valid.float()
        w_qt = (0.5 if symmetric else 1.0) / n_valid
        w_tq = 0.5 / n_valid if symmetric else 0.0
        if symmetric:
            lse_col = _column_lse(qf, tf, valid, inv_tau, chunk)
            count = torch.bincount(lab[valid], minlength=N).float()  # queries whose positive is column j

        loss = torch.zeros((), dtype=torch.float32, device=q.device)
        dq = torch.empty_like(qf) if need_dq else None  # every row block is written once
        dt = None  # the first chunk writes it, the others add to it
        gs = torch.zeros((), dtype=torch.float32, device=q.device)  # sum_ij G_ij s_ij / tau, for dtau
        for r0 in range(0, B, chunk):
            r1 = min(B, r0 + chunk)
            rows = torch.arange(r1 - r0, device=q.device)
            lc, kc = lab[r0:r1], keep[r0:r1]
            s = torch.mm(qf[r0:r1], tf.T).mul_(inv_tau)  # [c, N] logits
            pos = s[rows, lc]
            mx = s.amax(1, keepdim=True)
            p = s.sub(mx).exp_()  # one [c, N] buffer besides s: that pair is the working set
            se = p.sum(1, keepdim=True)
            lse = (mx + se.log()).squeeze(1)
            loss += w_qt * (kc * (lse - pos)).sum()
            if symmetric:
                loss += w_tq * (kc * (lse_col[lc] - pos)).sum()
            if not need_any:
                continue
            # g = G / tau with G = dL/ds = keep_i * (w_qt (P_row - 1[j = l_i]) + w_tq (count_j P_col - 1[j = l_i]));
            # 1/tau is the ds/dq and ds/dt factor, folded in here so dq and dt need no extra pass.
            a, b = w_qt * inv_tau, w_tq * inv_tau
            g = p.mul_(kc[:, None] * a / se)  # softmax, weight and padding mask in one pass
            if symmetric:
                g += torch.sub(s, lse_col).exp_().mul_(count * b).mul_(kc[:, None])
            g.index_put_((rows, lc), -kc * (a + b), accumulate=True)
            if need_dtau:
                gs += torch.dot(g.view(-1), s.view(-1))
            del s
            if need_dq:
                torch.mm(g, tf, out=dq[r0:r1])
            if need_dt:
                if dt is None:
                    dt = torch.mm(g.T, qf[r0:r1])
                else:
                    dt.addmm_(g.T, qf[r0:r1])
        # s = x / tau, so dL/dtau = sum G_ij * (-s_ij / tau) = -gs.
        ctx.grads = [dq, dt, -gs if need_dtau else None]
        ctx.dtypes = (q.dtype, t.dtype, tau.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("the chunked InfoNCE hands its precomputed gradients out once; "
                               "recompute the loss instead of calling backward twice (retain_graph)")
        grads, ctx.grads = ctx.grads, None
        # loss.backward() sends 1.0; skipping the multiply saves a pass over dq and dt (on CPU
        # the check is free; elsewhere it would cost a sync, so always multiply there).
        unit = grad_loss.device.type == "cpu" and grad_loss.numel() == 1 and float(grad_loss) == 1.0
        out = []
        for g, dtype in zip(grads, ctx.dtypes):
            # In place: these buffers are the gradients; a scaled copy would double their memory.
            if g is not None and not unit:
                g.mul_(grad_loss)
            out.append(None if g is None else g.to(dtype))
        return out[0], out[1], out[2], None, None, None, None, None


def _needs(q, t, tau):
    enabled = torch.is_grad_enabled()
    return (enabled and q.requires_grad, enabled and t.requires_grad, enabled and tau.requires_grad)


def info_nce_chunked(q, t, labels, tau, symmetric=False, n_valid=None, chunk_size=None) -> torch.Tensor:
    """Chunked InfoNCE (inputs assumed valid: call `info_nce` for checked inputs).
    tau: 0-d fp32 tensor (may require grad); labels: int64 [B] with -100 for ignored rows."""
    if n_valid is None:
        n_valid = int((labels != IGNORE_INDEX).sum())
    chunk = chunk_size or default_chunk(t.shape[0])
    return InfoNCEChunked.apply(q, t, tau, labels, symmetric, n_valid, chunk, _needs(q, t, tau))


def info_nce(q: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
             temperature: float | torch.Tensor = 0.02, symmetric: bool = False,
             backend: str | None = None, *, chunk_size: int | None = None,
             layout: str | None = None) -> torch.Tensor:
    """Contrastive loss of queries against targets (positives + in-batch / gathered / hard negatives).

    Args:
        q: [B, D] query embeddings (float32 / bfloat16 / float16), already normalised.
        t: [N, D] target embeddings, same dtype and device.
        labels: int [B], index into N of each query's positive; -100 ignores a (padding) row.
            Label convention: query i's positive is t[labels[i]]; every other row of t is a
            negative for it. Default (N == B only): arange(B). With N != B and no labels, pass
            `layout` or the call is refused (a guess would silently train on wrong positives).
        layout: where the positives are when labels is None and N = k * B: "block" (t[i], the
            B positives first, then negatives) or "interleaved" (t[i * k]: VLM2Vec's
            [pos_0, neg_0, ..., pos_1, neg_1, ...]).
        temperature: float, or a 1-element tensor (learnable; receives a gradient).
        symmetric: average the q->t and t->q losses (CLIP); needs N == B.
        backend: "triton", "chunked", "ref" or None (= $TTE_KERNEL_BACKEND, else by device).
        chunk_size: rows of q per step of the chunked path (default $TTE_INFONCE_CHUNK, else
            about 8M scores per step).

    Returns:
        fp32 scalar, the mean loss over non-ignored rows.
    """
    labels, tau, n_valid = check_info_nce(q, t, labels, temperature, symmetric, layout)
    chunk = chunk_from_env(ENV_INFONCE_CHUNK, chunk_size)
    name = resolve_backend(backend, q.device)
    if name == "ref":
        return info_nce_ref(q, t, labels, tau if isinstance(temperature, torch.Tensor) else float(temperature),
                            symmetric)
    if name == "chunked":
        return info_nce_chunked(q, t, labels, tau, symmetric, n_valid, chunk)
    from .infonce_triton import info_nce_triton  # lazy: the other paths must work without triton

    return info_nce_triton(q, t, labels, tau, symmetric, n_valid)
