"""The Triton kernels equal the references: forward and every gradient, fp32 and half precision.

    pytest tests/test_kernels_triton.py -q                      # CPU: runs itself in the interpreter
    TRITON_INTERPRET=1 pytest tests/test_kernels_triton.py -q   # same, in this process
    pytest tests/test_kernels_triton.py -q                      # on a CUDA machine: real kernels

Why a child process: Triton decides interpreter-or-compiler when it decorates a kernel, i.e.
when tte_kernels' Triton modules are first imported, from TRITON_INTERPRET. In a pytest run that
also holds other people's tests, triton may already be imported without it, and setting the
variable late would leave the kernels compiled for a GPU that is not there. So without CUDA and
without TRITON_INTERPRET, the first test here runs this file once in a child pytest with
TRITON_INTERPRET=1 and a JUnit report, and every test reports the outcome of its own twin there.
"""
import functools
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from tte_kernels import info_nce, info_nce_ref, pool, pool_ref, resolve_backend
from tte_kernels.dispatch import interpret_mode
from tte_kernels.testing import (
    INFONCE_CASES, assert_close32, assert_within_budget, infonce_grads, infonce_inputs, pool_grads, pool_inputs,
)

pytestmark = pytest.mark.slow

INTERPRETED = interpret_mode()
DIRECT = INTERPRETED or torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def _child_outcomes():
    report = Path(tempfile.mkdtemp(prefix="tte_triton_")) / "junit.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    log = (proc.stdout[-6000:] + "\n" + proc.stderr[-3000:]).strip()
    outcomes = {}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            skipped = case.find("skipped")
            if bad is not None:
                outcomes[case.get("name")] = ("failed", f"{bad.get('message', '')}\n{bad.text or ''}")
            elif skipped is not None:
                outcomes[case.get("name")] = ("skipped", skipped.get("message", ""))
            else:
                outcomes[case.get("name")] = ("passed", "")
    return outcomes, log


def kernel_test(fn):
    """Run fn here if the kernels can run here, else report its outcome in the interpreter child."""
    if DIRECT:
        return fn

    @functools.wraps(fn)
    def delegated(*args, **kwargs):
        name = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].rsplit(" (", 1)[0]
        outcomes, log = _child_outcomes()
        if name not in outcomes:
            pytest.fail(f"{name} did not run in the TRITON_INTERPRET=1 child; its output:\n{log}", pytrace=False)
        status, message = outcomes[name]
        if status == "skipped":
            pytest.skip(message)
        if status == "failed":
            pytest.fail(f"in the TRITON_INTERPRET=1 child:\n{message}", pytrace=False)

    return delegated


def _triton_loss(q, t, labels, **kw):
    return info_nce(q, t, labels, backend="triton", **kw)


def _on(device, *tensors):
    return [x.to(device) for x in tensors]


# --- InfoNCE ----------------------------------------------------------------------------------

@pytest.mark.parametrize("learnable_tau", [False, True], ids=["float_tau", "tensor_tau"])
@pytest.mark.parametrize("case", INFONCE_CASES, ids=lambda c: c.name)
@kernel_test
def test_triton_info_nce_matches_reference_fp32(case, learnable_tau):
    q, t, labels = _on(DEVICE, *infonce_inputs(case))
    tau = torch.tensor(0.02, device=DEVICE) if learnable_tau else 0.02
    expected = infonce_grads(info_nce_ref, q, t, labels, tau, case.symmetric)
    got = infonce_grads(_triton_loss, q, t, labels, tau, case.symmetric)
    assert_close32(got, expected, where=f"{case.name}: ")


@pytest.mark.parametrize("case", [c for c in INFONCE_CASES if c.name in ("padding_rows_symmetric", "hard_negatives")],
                         ids=lambda c: c.name)
@kernel_test
def test_triton_info_nce_matches_reference_with_16_wide_tiles(case):
    # Many partial tiles, several D slices per dot, and whole tiles of ignored rows.
    from tte_kernels.infonce_triton import info_nce_triton

    q, t, labels = _on(DEVICE, *infonce_inputs(case))
    tau = torch.tensor(0.02, device=DEVICE)
    expected = infonce_grads(info_nce_ref, q, t, labels, tau, case.symmetric)

    def small_tiles(q, t, labels, temperature, symmetric):
        return info_nce_triton(q, t, labels, temperature, symmetric, block_m=16, block_n=16, block_k=16)

    assert_close32(infonce_grads(small_tiles, q, t, labels, tau, case.symmetric), expected, where=f"{case.name}: ")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [c for c in INFONCE_CASES if c.name in ("square_70_symmetric", "wide_1023")],
                         ids=lambda c: c.name)
@kernel_test
def test_triton_info_nce_half_precision_within_error_budget(case, dtype):
    q, t, labels = _on(DEVICE, *infonce_inputs(case, dtype=dtype))
    tau = torch.tensor(0.02, device=DEVICE)
    ref32 = infonce_grads(info_nce_ref, q.float(), t.float(), labels, tau, case.symmetric)
    lowp = infonce_grads(lambda *a, **kw: info_nce_ref(*a, upcast=False, **kw), q, t, labels, tau, case.symmetric)
    got = infonce_grads(_triton_loss, q, t, labels, tau, case.symmetric)
    assert got["dq"].dtype == dtype and got["dt"].dtype == dtype
    assert_within_budget(got, ref32, lowp, where=f"{case.name} {dtype}: ")


@kernel_test
def test_triton_info_nce_without_grad_returns_the_loss():
    q, t, labels = _on(DEVICE, *infonce_inputs(INFONCE_CASES[3]))
    with torch.no_grad():
        loss = info_nce(q, t, labels, backend="triton")
    torch.testing.assert_close(loss, info_nce_ref(q, t, labels), atol=1e-5, rtol=1e-4)


@kernel_test
def test_triton_is_the_default_on_cuda_and_forced_by_the_environment(monkeypatch):
    monkeypatch.setenv("TTE_KERNEL_BACKEND", "triton")
    assert resolve_backend(None, torch.device(DEVICE)) == "triton"
    q, t, labels = _on(DEVICE, *infonce_inputs(INFONCE_CASES[1]))
    torch.testing.assert_close(info_nce(q, t, labels), info_nce_ref(q, t, labels), atol=1e-5, rtol=1e-4)
    monkeypatch.delenv("TTE_KERNEL_BACKEND")
    assert resolve_backend(None, torch.device("cuda")) == "triton"


# --- pooling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["last", "mean"])
@pytest.mark.parametrize("shape", [(1, 1, 33), (1, 6, 33), (70, 37, 33), (3, 200, 300)],
                         ids=lambda s: "x".join(map(str, s)))
@kernel_test
def test_triton_pool_matches_reference_fp32(shape, kind):
    hidden, sel = pool_inputs(*shape, kind, device=DEVICE)
    expected = pool_grads(pool_ref, hidden, **sel)
    got = pool_grads(lambda h, **kw: pool(h, backend="triton", **kw), hidden, **sel)
    assert_close32(got, expected, where=f"{shape} {kind}: ")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["last", "mean"])
@kernel_test
def test_triton_pool_half_precision_within_error_budget(kind, dtype):
    hidden, sel = pool_inputs(70, 37, 33, kind, dtype=dtype, device=DEVICE)
    ref32 = pool_grads(pool_ref, hidden.float(), **sel)
    lowp = pool_grads(lambda h, **kw: pool_ref(h, upcast=False, **kw), hidden, **sel)
    got = pool_grads(lambda h, **kw: pool(h, backend="triton", **kw), hidden, **sel)
    assert got["y"].dtype == torch.float32 and got["dh"].dtype == dtype
    assert_within_budget(got, ref32, lowp, where=f"{kind} {dtype}: ")


@kernel_test
def test_triton_pool_ignores_non_finite_padding():
    hidden, sel = pool_inputs(4, 9, 8, "mean", device=DEVICE)
    hidden[~sel["mask"]] = float("nan")
    assert torch.isfinite(pool(hidden, backend="triton", **sel)).all()
