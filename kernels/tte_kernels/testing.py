"""Shared test cases and comparisons for the kernel tests (tests/test_kernels_*.py).

    from tte_kernels.testing import INFONCE_CASES, infonce_inputs, infonce_grads, assert_close32
    pytest tests/test_kernels*.py -q

The same cases run against the chunked path in-process and against the Triton kernels in the
interpreter (or on CUDA), so every fast path is held to the same reference on the same shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .constants import IGNORE_INDEX

ATOL32, RTOL32 = 1e-5, 1e-4  # the fp32 acceptance tolerance


@dataclass(frozen=True)
class InfoNCECase:
    """One InfoNCE shape. labels: 'diag' (arange(B)), 'perm' (a permutation of N's first B),
    'rank' (arange(B) + rank * B into N = world * B), 'padded' (diag with ignored rows)."""
    name: str
    B: int
    N: int
    D: int
    labels: str = "diag"
    symmetric: bool = False


INFONCE_CASES = [
    InfoNCECase("single_row", 1, 1, 33),
    InfoNCECase("square_70", 70, 70, 33),
    InfoNCECase("square_70_symmetric", 70, 70, 33, symmetric=True),
    InfoNCECase("wide_1023", 70, 1023, 33, labels="perm"),
    InfoNCECase("hard_negatives", 70, 70 + 53, 33),
    InfoNCECase("cross_rank", 16, 64, 33, labels="rank"),
    InfoNCECase("padding_rows", 70, 70, 33, labels="padded"),
    InfoNCECase("padding_rows_symmetric", 70, 70, 33, labels="padded", symmetric=True),
]


def unit_rows(n: int, d: int, generator: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=generator), dim=-1).to(dtype).to(device)


def infonce_inputs(case: InfoNCECase, dtype=torch.float32, device="cpu", seed: int = 0):
    """(q [B, D], t [N, D], labels [B]) for a case; deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    q = unit_rows(case.B, case.D, g, dtype, device)
    t = unit_rows(case.N, case.D, g, dtype, device)
    # Make positives genuinely closer than negatives, as after some training, so the loss is
    # not flat and the softmax is not uniform.
    labels = torch.arange(case.B)
    if case.labels == "perm":
        labels = torch.randperm(case.N, generator=g)[:case.B]
    elif case.labels == "rank":
        labels = torch.arange(case.B) + 2 * case.B  # rank 2 of N // B
    t32 = t.float().cpu()
    t32[labels] = F.normalize(t32[labels] + 0.5 * q.float().cpu(), dim=-1)
    t = t32.to(dtype).to(device)
    if case.labels == "padded":
        labels = labels.clone()
        labels[16:32] = IGNORE_INDEX  # a whole 16-row tile of padding, plus scattered rows
        labels[[0, 41, 69]] = IGNORE_INDEX
    return q, t, labels.to(device)


def infonce_grads(fn, q, t, labels, temperature, symmetric, **kw):
    """Loss and gradients (q, t, and temperature when it is a tensor) of fn(...).backward()."""
    q = q.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach().clone().requires_grad_(True)
    loss = fn(q, t, labels, temperature=temperature, symmetric=symmetric, **kw)
    loss.backward()
    dtau = temperature.grad if isinstance(temperature, torch.Tensor) else None
    return {"loss": loss.detach(), "dq": q.grad, "dt": t.grad, "dtau": dtau}


def pool_inputs(B: int, T: int, D: int, kind: str, dtype=torch.float32, device="cpu", seed: int = 0):
    """(hidden [B, T, D], dict(positions=...) or dict(mask=...)) with padding: rows of unequal
    length, right- and left-padded, and (mean) one row with nothing pooled."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    left = torch.arange(B) % 2 == 1  # odd rows left-padded
    hidden = hidden.to(dtype).to(device)
    if kind == "last":
        positions = torch.where(left, torch.full_like(lengths, -1), lengths - 1)  # -1: Python-style last
        return hidden, {"positions": positions.to(device)}
    ar = torch.arange(T)[None, :]
    mask = torch.where(left[:, None], ar >= T - lengths[:, None], ar < lengths[:, None])
    if B > 2:
        mask[2] = False  # a padding row: nothing pooled
    return hidden, {"mask": mask.to(device)}


def pool_grads(fn, hidden, seed: int = 1, **kw):
    """Output and d/dhidden of <fn(hidden), w> for a fixed random w."""
    hidden = hidden.detach().clone().requires_grad_(True)
    y = fn(hidden, **kw)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    (y * w).sum().backward()
    return {"y": y.detach(), "dh": hidden.grad}


def tau_grad_atol(q, t, labels, temperature, symmetric: bool = False) -> float:
    """fp32 tolerance of dL/dtau: -(1/tau) * mean_i sum_j G_ij s_ij sums terms of size p_ij |s_ij|
    and |s_i,label| that cancel (for one column exactly), so a kernel that rounds each term once
    (GPU FMA contraction, fast exp) is off by a few ulps of their sum, not of the result. Returns
    16 fp32 epsilons of that sum (doubled for the symmetric loss) plus ATOL32."""
    tau = float(temperature)
    q, t = q.detach().double().cpu(), t.detach().double().cpu()
    labels = labels.cpu() if labels is not None else torch.arange(q.shape[0])
    kept = labels != IGNORE_INDEX
    s = (q[kept] @ t.T) / tau
    magnitude = (torch.softmax(s, -1) * s.abs()).sum(-1) + s.gather(1, labels[kept][:, None]).abs()[:, 0]
    scale = float(magnitude.mean()) / tau * (2 if symmetric else 1)
    return ATOL32 + 16 * torch.finfo(torch.float32).eps * scale


def assert_close32(actual: dict, expected: dict, where: str = "", atol: dict | None = None) -> None:
    """fp32 closeness of every output; `atol` overrides the absolute tolerance per key."""
    for key, exp in expected.items():
        if exp is None:
            assert actual[key] is None, f"{where}{key}: expected no gradient"
            continue
        torch.testing.assert_close(actual[key].float(), exp.float(), atol=(atol or {}).get(key, ATOL32),
                                   rtol=RTOL32, msg=lambda m, k=key: f"{where}{k}: {m}")


def assert_within_budget(kernel: dict, ref32: dict, lowp: dict, atol: float = 1e-5, where: str = "") -> None:
    """flash-attention's rule: max|kernel - ref32| <= 2 * max|torch_lowp - ref32| + atol."""
    for key, r in ref32.items():
        if r is None:
            continue
        err = (kernel[key].float() - r.float()).abs().max().item()
        base = (lowp[key].float() - r.float()).abs().max().item()
        assert err <= 2 * base + atol, f"{where}{key}: kernel error {err:.3g} > 2 * torch low-precision error " \
                                       f"{base:.3g} + {atol:g}"
