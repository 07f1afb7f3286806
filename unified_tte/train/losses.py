"""The embed stage's contrastive loss, with targets gathered across ranks with gradient.

    from unified_tte.train.losses import contrastive_loss
    loss = contrastive_loss(q, pos, neg, temperature=0.02)   # q, pos, neg: [B, D] per rank

Every rank holds B queries, their B positives and (optionally) B hard negatives. The targets of
the loss are the positives and hard negatives of *all* ranks (W * B or 2 * W * B rows); the
label of local query i on rank r is its own positive, r * B + i. The loss on each rank is the
mean over its B queries (`tte_kernels.info_nce`: tiled, never materialises B x N scores).

Gradient bookkeeping: `gather_with_grad` sums the gradients of every rank's loss in its backward
(all-reduce) and hands each rank its own slice, so each rank's embeddings receive
d(sum_r L_r)/d(emb). DeepSpeed then averages parameter gradients over ranks, which gives the
gradient of the global mean loss — the same as one process holding the whole batch
(tests/test_train_dist.py holds the two equal).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from einops import rearrange
from tte_kernels import info_nce


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in forward; in backward, the sum over ranks of the gradient, own slice.

    torch.distributed.nn's all_gather uses reduce_scatter / all_to_all in backward, which gloo
    (the CPU backend) lacks; an all_reduce of the gathered gradient works everywhere and costs
    only embedding-sized traffic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], rank
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, D] per rank -> [W * B, D] in rank order; every rank must pass the same B."""
    if not distributed():
        return x
    return _GatherWithGrad.apply(x)


def contrastive_loss(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None,
                     temperature: float | torch.Tensor = 0.02, gather: bool = True) -> torch.Tensor:
    """InfoNCE of local queries against the positives and hard negatives of every rank.

    Shapes: q, pos, neg [B, D] (unit vectors, fp32). Returns the mean loss over the B local
    queries. With `gather=False` (or one process) the targets are this rank's only.
    """
    rows = q.shape[0]
    if pos.shape[0] != rows or (neg is not None and neg.shape[0] != rows):
        raise ValueError(f"q, pos and neg need one row per query; got {rows}, {pos.shape[0]}"
                         f"{'' if neg is None else ', ' + str(neg.shape[0])}")
    local = pos if neg is None else torch.cat([pos, neg], 0)           # [B or 2B, D]
    offset = 0
    if gather and distributed():
        world = dist.get_world_size()
        everything = rearrange(gather_with_grad(local), "(rank n) d -> rank n d", rank=world)
        # Positives of all ranks first, then all hard negatives: the label of a query does not
        # depend on whether negatives are used.
        targets = rearrange(everything[:, :rows], "rank b d -> (rank b) d")
        if neg is not None:
            targets = torch.cat([targets, rearrange(everything[:, rows:], "rank b d -> (rank b) d")], 0)
        offset = dist.get_rank() * rows
    else:
        targets = local
    labels = torch.arange(rows, device=q.device) + offset
    return info_nce(q, targets, labels=labels, temperature=temperature)
