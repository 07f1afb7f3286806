"""The two stage steps, each the backward of one global batch on this rank: `think_backward`
(SFT on the trace tokens) and `embed_backward` (InfoNCE through the serving fast path, with
GradCache). The optimizer step after them is the loop's (train/loop.py).

    loss, tokens, finite = embed_backward(engine, rows, chunk=8, temperature=0.02)
    engine.step()
"""
from __future__ import annotations

import torch

from ..errors import TrainError
from .batches import encode_prompts
from .losses import contrastive_loss
from .rng import set_torch_rng, torch_rng


def think_backward(engine, rows: list, micro: int) -> tuple[float, int, bool]:
    """Backward of one think step over this rank's rows, micro-batch by micro-batch.
    Calls engine.step() after every micro-batch but the last: the caller checks the loss and
    takes the optimizer step. Returns (mean loss, tokens, finite)."""
    tte = engine.module.tte
    losses, tokens, finite = [], 0, True
    chunks = [rows[i:i + micro] for i in range(0, len(rows), micro)]
    for k, chunk in enumerate(chunks):
        inputs, traces = [r.qry for r in chunk], [r.trace for r in chunk]
        prompts, n = encode_prompts(tte, inputs, traces, ids=[r.id for r in chunk])
        tokens += n - len(chunk) * len(tte.invocation_ids)  # sft runs no invocation
        loss = engine("sft", inputs, traces, prompts)
        finite &= bool(torch.isfinite(loss.detach()))
        engine.backward(loss)
        losses.append(float(loss.detach()))
        if k < len(chunks) - 1:
            engine.step()
    return sum(losses) / len(losses), tokens, finite


def embed_backward(engine, rows: list, chunk: int | None, temperature: float, use_traces: bool = True,
                   hard_negatives: bool = True, gather: bool = True,
                   keep_prefix: bool = True) -> tuple[float, int, bool]:
    """Backward of one embed step over this rank's rows (GradCache when `chunk` is set).
    Like think_backward, the last engine.step() is the caller's. Returns (loss, tokens, finite).

    GradCache with `keep_prefix`: the pass without grad keeps each chunk's prefix state, so the
    pass with grad runs only the embed step (activated: the invocation tokens; top_k: the top K
    layers). Without it the pass with grad recomputes the prefix (less memory: one chunk's KV
    cache at a time instead of the whole batch's)."""
    tte = engine.module.tte
    B = len(rows)
    q_in = [r.qry for r in rows]
    traces = [r.trace for r in rows] if use_traces else None
    t_in = [r.pos for r in rows] + ([r.neg for r in rows] if hard_negatives else [])
    ids = [r.id for r in rows]
    q_prompts, q_tokens = encode_prompts(tte, q_in, traces, ids=ids)
    t_prompts, t_tokens = encode_prompts(tte, t_in, ids=ids, side="positive or hard negative")
    tokens = q_tokens + t_tokens

    def groups(a: int, b: int):
        """Rows [a, b) as two forwards: queries (with traces), then positives + hard negatives."""
        idx = list(range(a, b)) + ([B + i for i in range(a, b)] if hard_negatives else [])
        return [(q_in[a:b], traces[a:b] if traces else None, q_prompts[a:b]),
                ([t_in[i] for i in idx], None, [t_prompts[i] for i in idx])]

    def split(q, t, n_rows):
        return q, t[:n_rows], (t[n_rows:] if hard_negatives else None)

    if chunk is None:  # the plain twin: one forward with grad over the whole batch
        q, t = (engine("embed", *g) for g in groups(0, B))
        q, p, n = split(q, t, B)
        loss = contrastive_loss(q, p, n, temperature, gather)
        finite = bool(torch.isfinite(loss.detach()))
        engine.backward(loss, scale_wrt_gas=False)
        return float(loss.detach()), tokens, finite

    bounds = [(a, min(a + chunk, B)) for a in range(0, B, chunk)]
    if len(bounds) != engine.gradient_accumulation_steps():
        raise TrainError(f"{B} rows in chunks of {chunk} are {len(bounds)} backward passes, but the "
                         f"engine accumulates {engine.gradient_accumulation_steps()}; build it for this "
                         "batch (make_engine with the same batch_size and gradcache_chunk).")
    # 1. embeddings without grad, chunk by chunk. The RNG state before each embed step is kept,
    #    so its re-run draws the same dropout masks and reproduces these embeddings exactly.
    kept, parts = [], []
    with torch.no_grad():
        for a, b in bounds:
            out, keep = [], []
            for g in groups(a, b):
                state = engine("prefix", *g)
                rng = torch_rng()
                out.append(engine("from_state", state=state))  # leaves the state as it was
                keep.append((rng, state if keep_prefix else g))
            parts.append(split(*out, b - a))
            kept.append(keep)
    after = torch_rng()
    q = torch.cat([x[0] for x in parts]).requires_grad_()
    p = torch.cat([x[1] for x in parts]).requires_grad_()
    n = torch.cat([x[2] for x in parts]).requires_grad_() if hard_negatives else None
    del parts
    # 2. the loss over the whole batch (all ranks' targets) and its gradient w.r.t. embeddings
    loss = contrastive_loss(q, p, n, temperature, gather)
    finite = bool(torch.isfinite(loss.detach()))
    loss.backward()
    # 3. each chunk's embed step again, with grad; backprop the cached embedding gradients
    for k, (a, b) in enumerate(bounds):
        out = []
        for rng, saved in kept[k]:
            state = saved if keep_prefix else engine("prefix", *saved)
            set_torch_rng(rng)
            out.append(engine("from_state", state=state))
        kept[k] = None  # this chunk's KV cache can go
        qk, pk, nk = split(*out, b - a)
        surrogate = (qk * q.grad[a:b]).sum() + (pk * p.grad[a:b]).sum()
        if nk is not None:
            surrogate = surrogate + (nk * n.grad[a:b]).sum()
        engine.backward(surrogate, scale_wrt_gas=False)
        if k < len(bounds) - 1:
            engine.step()
    set_torch_rng(after)
    return float(loss.detach()), tokens, finite
