"""InfoNCE: the chunked path equals the reference; bad input fails before any kernel; dispatch.

    pytest tests/test_kernels_infonce.py -q

The Triton kernels are held to the same cases in tests/test_kernels_triton.py.
"""
import pytest
import torch

from tte_kernels import info_nce, info_nce_ref, resolve_backend
from tte_kernels.testing import (
    INFONCE_CASES, assert_close32, assert_within_budget, infonce_grads, infonce_inputs,
)


def _chunked(chunk):
    return lambda q, t, labels, **kw: info_nce(q, t, labels, backend="chunked", chunk_size=chunk, **kw)


def _ref(q, t, labels, **kw):
    return info_nce_ref(q, t, labels, **kw)


@pytest.mark.parametrize("learnable_tau", [False, True], ids=["float_tau", "tensor_tau"])
@pytest.mark.parametrize("case", INFONCE_CASES, ids=lambda c: c.name)
def test_chunked_info_nce_matches_reference_fp32(case, learnable_tau):
    q, t, labels = infonce_inputs(case)
    tau = torch.tensor(0.02) if learnable_tau else 0.02
    expected = infonce_grads(_ref, q, t, labels, tau, case.symmetric)
    for chunk in (None, 7):  # the default (one chunk here) and uneven chunks
        got = infonce_grads(_chunked(chunk), q, t, labels, tau, case.symmetric)
        assert_close32(got, expected, where=f"{case.name} chunk={chunk}: ")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [c for c in INFONCE_CASES if c.name in ("square_70_symmetric", "wide_1023")],
                         ids=lambda c: c.name)
def test_chunked_info_nce_half_precision_within_error_budget(case, dtype):
    q, t, labels = infonce_inputs(case, dtype=dtype)
    tau = torch.tensor(0.02)
    ref32 = infonce_grads(_ref, q.float(), t.float(), labels, tau, case.symmetric)
    lowp = infonce_grads(lambda *a, **kw: info_nce_ref(*a, upcast=False, **kw), q, t, labels, tau, case.symmetric)
    got = infonce_grads(_chunked(16), q, t, labels, tau, case.symmetric)
    assert got["dq"].dtype == dtype and got["dt"].dtype == dtype
    assert_within_budget(got, ref32, lowp, where=f"{case.name} {dtype}: ")


def test_info_nce_default_labels_and_temperature_are_the_diagonal_at_0_02():
    q, t, _ = infonce_inputs(INFONCE_CASES[1])
    expected = torch.nn.functional.cross_entropy(q @ t.T / 0.02, torch.arange(q.shape[0]))
    torch.testing.assert_close(info_nce(q, t, backend="chunked"), expected, atol=1e-5, rtol=1e-4)


def test_symmetric_info_nce_is_the_mean_of_both_directions():
    q, t, _ = infonce_inputs(INFONCE_CASES[1])
    ar = torch.arange(q.shape[0])
    s = q @ t.T / 0.02
    expected = (torch.nn.functional.cross_entropy(s, ar) + torch.nn.functional.cross_entropy(s.T, ar)) / 2
    torch.testing.assert_close(info_nce(q, t, symmetric=True, backend="chunked"), expected, atol=1e-5, rtol=1e-4)


def test_padding_rows_are_ignored_as_if_removed():
    case = next(c for c in INFONCE_CASES if c.name == "padding_rows")
    q, t, labels = infonce_inputs(case)
    keep = labels != -100
    got = infonce_grads(_chunked(9), q, t, labels, 0.02, False)
    removed = infonce_grads(_chunked(9), q[keep], t, labels[keep], 0.02, False)
    torch.testing.assert_close(got["loss"], removed["loss"])
    torch.testing.assert_close(got["dt"], removed["dt"], atol=1e-6, rtol=1e-5)
    assert torch.all(got["dq"][~keep] == 0)


def test_chunked_info_nce_without_grad_returns_the_loss_only():
    q, t, labels = infonce_inputs(INFONCE_CASES[3])
    with torch.no_grad():
        loss = info_nce(q.requires_grad_(), t, labels, backend="chunked", chunk_size=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, info_nce_ref(q.detach(), t, labels), atol=1e-5, rtol=1e-4)


def test_chunked_info_nce_gradient_only_for_inputs_that_need_it():
    q, t, labels = infonce_inputs(INFONCE_CASES[4])
    q.requires_grad_(True)
    info_nce(q, t, labels, backend="chunked").backward()  # t frozen, e.g. a cached target tower
    assert q.grad is not None and t.grad is None


def test_chunked_info_nce_scales_gradients_by_the_upstream_gradient():
    q, t, labels = infonce_inputs(INFONCE_CASES[1])
    a, b = q.clone().requires_grad_(), q.clone().requires_grad_()
    (3.0 * info_nce(a, t, labels, backend="chunked", chunk_size=8)).backward()
    (3.0 * info_nce_ref(b, t, labels)).backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_chunk_size_comes_from_the_environment(monkeypatch):
    q, t, labels = infonce_inputs(INFONCE_CASES[1])
    calls = []
    import tte_kernels.infonce as mod
    real = mod.InfoNCEChunked.apply
    monkeypatch.setattr(mod.InfoNCEChunked, "apply", lambda *a: calls.append(a[6]) or real(*a))
    monkeypatch.setenv("TTE_INFONCE_CHUNK", "5")
    info_nce(q, t, labels, backend="chunked")
    assert calls == [5]
    monkeypatch.setenv("TTE_INFONCE_CHUNK", "zero")
    with pytest.raises(ValueError, match="TTE_INFONCE_CHUNK"):
        info_nce(q, t, labels, backend="chunked")


# --- dispatch ---------------------------------------------------------------------------------

def test_backend_defaults_to_chunked_on_cpu(monkeypatch):
    monkeypatch.delenv("TTE_KERNEL_BACKEND", raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "chunked"


@pytest.mark.parametrize("name", ["chunked", "ref"])
def test_environment_variable_forces_the_backend(monkeypatch, name):
    monkeypatch.setenv("TTE_KERNEL_BACKEND", name)
    assert resolve_backend(None, torch.device("cpu")) == name
    assert resolve_backend("chunked", torch.device("cpu")) == "chunked"  # an explicit argument wins


def test_environment_forces_ref_through_info_nce(monkeypatch):
    import tte_kernels.infonce as mod
    seen = []
    monkeypatch.setattr(mod, "info_nce_ref", lambda *a, **k: seen.append("ref") or info_nce_ref(*a, **k))
    monkeypatch.setenv("TTE_KERNEL_BACKEND", "ref")
    q, t, labels = infonce_inputs(INFONCE_CASES[1])
    info_nce(q, t, labels)
    assert seen == ["ref"]


def test_triton_backend_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, t, labels = infonce_inputs(INFONCE_CASES[1])
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        info_nce(q, t, labels, backend="triton")


def test_unknown_backend_is_rejected(monkeypatch):
    q, t, labels = infonce_inputs(INFONCE_CASES[1])
    with pytest.raises(ValueError, match="not a tte_kernels backend"):
        info_nce(q, t, labels, backend="cuda")
    monkeypatch.setenv("TTE_KERNEL_BACKEND", "fast")
    with pytest.raises(ValueError, match="TTE_KERNEL_BACKEND"):
        info_nce(q, t, labels)


# --- bad input --------------------------------------------------------------------------------

def _bad_inputs():
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    nan_q = q.clone()
    nan_q[1, 2] = float("nan")
    inf_t = t.clone()
    inf_t[0, 0] = float("inf")
    meta = torch.empty(4, dtype=torch.long, device="meta")
    return [
        ("mismatched_dim", dict(q=q, t=torch.randn(6, 9)), ValueError, "embedding dim 8 but t has 9"),
        ("q_not_2d", dict(q=q[None], t=t), ValueError, r"q must be \[B, D\]"),
        ("q_not_tensor", dict(q=q.tolist(), t=t), TypeError, "q must be a torch.Tensor"),
        ("int_dtype", dict(q=q.long(), t=t.long()), TypeError, "q has dtype torch.int64"),
        ("mixed_dtype", dict(q=q.half(), t=t), TypeError, "cast both"),
        ("label_too_large", dict(q=q, t=t, labels=torch.tensor([0, 1, 6, 2])), ValueError, r"labels must lie in \[0, N=6\)"),
        ("label_negative", dict(q=q, t=t, labels=torch.tensor([0, -1, 2, 3])), ValueError, "labels must lie"),
        ("label_float", dict(q=q, t=t, labels=torch.tensor([0.0, 1, 2, 3])), TypeError, "labels has dtype"),
        ("label_count", dict(q=q, t=t, labels=torch.tensor([0, 1])), ValueError, "one label per query"),
        ("all_ignored", dict(q=q, t=t, labels=torch.full((4,), -100)), ValueError, "no query to train on"),
        ("nan_query", dict(q=nan_q, t=t), ValueError, "q has NaN or Inf"),
        ("inf_target", dict(q=q, t=inf_t), ValueError, "t has NaN or Inf"),
        ("zero_temperature", dict(q=q, t=t, temperature=0.0), ValueError, "temperature must be finite and > 0"),
        ("negative_tensor_temperature", dict(q=q, t=t, temperature=torch.tensor(-1.0)), ValueError,
         "temperature must be finite"),
        ("vector_temperature", dict(q=q, t=t, temperature=torch.ones(2)), ValueError, "1-element tensor"),
        ("string_temperature", dict(q=q, t=t, temperature="0.02"), TypeError, "temperature must be a float"),
        ("symmetric_needs_square", dict(q=q, t=t, symmetric=True), ValueError, "N == B"),
        ("labels_on_other_device", dict(q=q, t=t, labels=meta), ValueError, "labels is on meta"),
        ("targets_on_other_device", dict(q=q, t=t.to("meta")), ValueError, "t is on meta"),
    ]


@pytest.mark.parametrize("kwargs,error,message", [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()])
@pytest.mark.parametrize("backend", ["chunked", "ref", "triton"])
def test_bad_input_is_rejected_before_any_kernel_with_a_clear_error(monkeypatch, kwargs, error, message, backend):
    import tte_kernels.infonce as mod

    def must_not_run(*a, **k):
        raise AssertionError("a kernel ran on bad input")

    for name in ("info_nce_ref", "info_nce_chunked"):
        monkeypatch.setattr(mod, name, must_not_run)
    with pytest.raises(error, match=message):
        info_nce(**kwargs, backend=backend)
