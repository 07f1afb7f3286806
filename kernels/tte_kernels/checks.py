"""Input checks shared by every backend, run before any kernel launches.

A bad batch must fail with a message that names the argument and says what to do, not with an
illegal memory access inside a Triton kernel or a NaN loss three steps later. Shape, dtype and
device checks are free; the value checks (finite inputs, label and position ranges) cost one
device sync per call, which the training loop pays anyway when it logs the loss.

    from tte_kernels.checks import check_info_nce, check_pool   # called by info_nce / pool
    pytest tests/test_kernels_infonce.py tests/test_kernels_pool.py -q -k bad   # the error cases
"""
from __future__ import annotations

import math

import torch

from .constants import IGNORE_INDEX

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _tensor(name: str, x, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {shape_doc}, got shape {tuple(x.shape)}")
    return x


def _float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; pass float32, bfloat16 or float16 (e.g. {name}.float())")


def _same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; move {name} to {ref.device}")


def _fetch(values: list[torch.Tensor]) -> list[int]:
    """Bring scalar checks to the host with one sync (bools come back as 0/1)."""
    if not values:
        return []
    return torch.stack([v.reshape(()).to(torch.int64) for v in values]).cpu().tolist()


def _raise_first(failures: list[tuple[torch.Tensor, str]]) -> None:
    """Evaluate boolean value checks with a single host sync, then raise the first that failed."""
    for passed, (_, message) in zip(_fetch([flag for flag, _ in failures]), failures):
        if not passed:
            raise ValueError(message)


LAYOUTS = ("block", "interleaved")   # where each query's positive sits when labels are not given


def check_info_nce(q, t, labels, temperature, symmetric, layout=None):
    """Validate InfoNCE inputs. Without labels, N must equal B (labels = arange(B)) unless
    `layout` says where the positives are among N = k * B targets: "block" (positives first,
    t[i] for query i) or "interleaved" (VLM2Vec's [pos_0, neg_0.., pos_1, ..]: t[i * k]).

    Returns (labels int64 [B] on q.device, temperature as a 0-d fp32 tensor on q.device — still
    attached to the caller's graph if it was a learnable tensor —, number of non-ignored rows).
    """
    q = _tensor("q", q, 2, "[B, D] (query embeddings)")
    t = _tensor("t", t, 2, "[N, D] (target embeddings)")
    _float("q", q)
    _float("t", t)
    if q.dtype != t.dtype:
        raise TypeError(f"q is {q.dtype} but t is {t.dtype}; cast both to one dtype")
    _same_device("t", t, "q", q)
    B, D = q.shape
    N, Dt = t.shape
    if B == 0 or N == 0 or D == 0:
        raise ValueError(f"q {tuple(q.shape)} and t {tuple(t.shape)} must be non-empty")
    if Dt != D:
        raise ValueError(f"q has embedding dim {D} but t has {Dt}; both must be [*, D] from the same embedder")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if symmetric and N != B:
        raise ValueError(
            f"symmetric=True needs as many targets as queries (N == B), got B={B}, N={N}; "
            "hard negatives or gathered targets need symmetric=False"
        )

    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
    guessed = labels is None and N != B
    if labels is None:
        labels = torch.arange(B, device=q.device)
        if N < B:
            raise ValueError(f"labels=None means labels = arange(B) but t has only N={N} < B={B} rows; pass labels")
        if layout == "interleaved":
            if N % B:
                raise ValueError(f"layout='interleaved' needs N = k * B targets, got B={B}, N={N}")
            labels = labels * (N // B)
    else:
        labels = _tensor("labels", labels, 1, "[B] (index of each query's positive in t)")
        if labels.dtype not in INT_DTYPES:
            raise TypeError(f"labels has dtype {labels.dtype}; pass an integer tensor (e.g. labels.long())")
        if labels.shape[0] != B:
            raise ValueError(f"labels has {labels.shape[0]} entries but q has B={B} rows; pass one label per query")
        _same_device("labels", labels, "q", q)
        labels = labels.long()

    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a float or a 1-element tensor, got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature tensor has dtype {temperature.dtype}; use a floating tensor")
        _same_device("temperature", temperature, "q", q)
        tau = temperature.reshape(()).float()
    elif isinstance(temperature, (float, int)) and not isinstance(temperature, bool):
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        tau = torch.tensor(float(temperature), dtype=torch.float32, device=q.device)
    else:
        raise TypeError(f"temperature must be a float or a scalar tensor, got {type(temperature).__name__}")

    valid = labels != IGNORE_INDEX
    in_range = ((labels >= 0) & (labels < N)) | ~valid
    lo, hi, n_bad, n_valid, q_ok, t_ok, tau_ok = _fetch([
        labels.min(), labels.max(), (~in_range).sum(), valid.sum(),
        torch.isfinite(q).all(), torch.isfinite(t).all(), torch.isfinite(tau) & (tau > 0),
    ])
    if n_bad:
        raise ValueError(f"labels must lie in [0, N={N}) (or be {IGNORE_INDEX} for a padding row); "
                         f"{n_bad} are outside, values span [{lo}, {hi}]")
    if n_valid == 0:
        raise ValueError(f"every label is {IGNORE_INDEX} (ignored); the batch has no query to train on")
    if not q_ok:
        raise ValueError("q has NaN or Inf entries; check the embedder outputs before the loss")
    if not t_ok:
        raise ValueError("t has NaN or Inf entries; check the embedder outputs before the loss")
    if not tau_ok:
        raise ValueError("temperature must be finite and > 0")
    if guessed and layout is None:
        raise ValueError(f"t has N={N} rows for B={B} queries and no labels: say where the positives are, "
                         "labels=... (e.g. arange(B) when the B positives come first), or "
                         "layout='block' (positives first) / 'interleaved' ([pos_0, neg_0.., pos_1, ..], VLM2Vec)")
    return labels, tau, int(n_valid)


def check_pool(hidden, positions, mask):
    """Validate pooling inputs.

    Returns (positions int64 [B] in [0, T) or None, mask bool [B, T] or None).
    """
    hidden = _tensor("hidden", hidden, 3, "[B, T, D] (final-layer hidden states)")
    _float("hidden", hidden)
    B, T, D = hidden.shape
    if B == 0 or T == 0 or D == 0:
        raise ValueError(f"hidden must be non-empty, got shape {tuple(hidden.shape)}")
    if (positions is None) == (mask is None):
        raise ValueError("pass exactly one of positions (LongTensor [B], last-token pooling) "
                         "or mask ([B, T], mean over masked positions)")
    failures: list[tuple[torch.Tensor, str]] = []
    if positions is not None:
        positions = _tensor("positions", positions, 1, "[B] (index into T of each pooled token)")
        if positions.dtype not in INT_DTYPES:
            raise TypeError(f"positions has dtype {positions.dtype}; pass an integer tensor (e.g. positions.long())")
        if positions.shape[0] != B:
            raise ValueError(f"positions has {positions.shape[0]} entries but hidden has B={B} rows")
        _same_device("positions", positions, "hidden", hidden)
        positions = positions.long()
        failures.append((((positions >= -T) & (positions < T)).all(),
                         f"positions must lie in [-T, T) with T={hidden.shape[1]}; check the invocation-token index"))
        # Python-style negative indices (-1 = last position) for left-padded batches.
        positions = torch.where(positions < 0, positions + T, positions)
        pooled = hidden[torch.arange(B, device=hidden.device), positions.clamp(0, T - 1)]
        failures.append((torch.isfinite(pooled).all(), "hidden has NaN or Inf at a pooled position"))
    else:
        mask = _tensor("mask", mask, 2, "[B, T] (1 where a position is pooled)")
        if mask.shape != (B, T):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but hidden is [B, T, D] = {tuple(hidden.shape)}; "
                             "pass a [B, T] mask")
        if mask.is_complex():
            raise TypeError(f"mask has dtype {mask.dtype}; pass bool or 0/1 values")
        _same_device("mask", mask, "hidden", hidden)
        if mask.dtype != torch.bool:
            failures.append((((mask == 0) | (mask == 1)).all(), "mask must hold only 0 and 1 (or be bool)"))
            mask = mask != 0
        # Only pooled positions must be finite; padding may hold anything. Scanned in slices of T
        # so the check never needs more memory than the chunked path itself.
        step = max(1, (1 << 24) // max(1, B * D))
        finite = torch.ones((), dtype=torch.bool, device=hidden.device)
        for t0 in range(0, T, step):
            part = torch.isfinite(hidden[:, t0:t0 + step]) | ~mask[:, t0:t0 + step, None]
            finite = finite & part.all()
        failures.append((finite, "hidden has NaN or Inf at a position where mask is set"))
    _raise_first(failures)
    return positions, mask
