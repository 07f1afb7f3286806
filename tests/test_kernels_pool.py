"""Pooling: the chunked path equals the reference; bad input fails before any kernel; dispatch.

    pytest tests/test_kernels_pool.py -q

The Triton kernels are held to the same cases in tests/test_kernels_triton.py.
"""
import pytest
import torch
import torch.nn.functional as F

from tte_kernels import pool, pool_ref
from tte_kernels.testing import assert_close32, assert_within_budget, pool_grads, pool_inputs

SHAPES = [(1, 1, 33), (1, 5, 33), (70, 37, 33), (4, 300, 64)]


def _chunked(chunk):
    return lambda hidden, **kw: pool(hidden, backend="chunked", chunk_size=chunk, **kw)


@pytest.mark.parametrize("kind", ["last", "mean"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunked_pool_matches_reference_fp32(shape, kind):
    hidden, sel = pool_inputs(*shape, kind)
    expected = pool_grads(pool_ref, hidden, **sel)
    for chunk in (None, 7):  # default and uneven chunks over T
        got = pool_grads(_chunked(chunk), hidden, **sel)
        assert_close32(got, expected, where=f"{shape} {kind} chunk={chunk}: ")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["last", "mean"])
def test_chunked_pool_half_precision_within_error_budget(kind, dtype):
    hidden, sel = pool_inputs(70, 37, 33, kind, dtype=dtype)
    ref32 = pool_grads(pool_ref, hidden.float(), **sel)
    lowp = pool_grads(lambda h, **kw: pool_ref(h, upcast=False, **kw), hidden, **sel)
    got = pool_grads(_chunked(8), hidden, **sel)
    assert got["y"].dtype == torch.float32 and got["dh"].dtype == dtype
    assert_within_budget(got, ref32, lowp, where=f"{kind} {dtype}: ")


@pytest.mark.parametrize("backend", ["chunked", "ref"])
def test_pool_output_is_unit_norm_and_a_padding_row_is_zero(backend):
    hidden, sel = pool_inputs(6, 10, 16, "mean")
    out = pool(hidden, backend=backend, **sel)
    norms = out.norm(dim=1)
    assert torch.allclose(norms[sel["mask"].any(1)], torch.ones(()), atol=1e-6)
    assert torch.all(out[2] == 0)  # row 2 pools nothing


def test_last_pooling_picks_the_position_and_negative_indices_count_from_the_end():
    hidden = torch.randn(3, 5, 8)
    got = pool(hidden, positions=torch.tensor([4, -1, 0]), backend="chunked")
    expected = F.normalize(hidden[[0, 1, 2], [4, 4, 0]], dim=-1)
    torch.testing.assert_close(got, expected)


def test_mean_pooling_accepts_integer_and_float_masks():
    hidden, sel = pool_inputs(5, 9, 8, "mean")
    expected = pool_ref(hidden, mask=sel["mask"])  # the reference twin, not the path under test
    for mask in (sel["mask"], sel["mask"].long(), sel["mask"].float()):
        torch.testing.assert_close(pool(hidden, mask=mask, backend="chunked"), expected)


def test_non_finite_values_in_padding_do_not_reach_the_embedding():
    hidden, sel = pool_inputs(4, 9, 8, "mean")
    hidden[~sel["mask"]] = float("nan")
    for backend in ("chunked", "ref"):
        assert torch.isfinite(pool(hidden, mask=sel["mask"], backend=backend)).all()


@pytest.mark.parametrize("kind", ["last", "mean"])
@pytest.mark.parametrize("backend", ["chunked", "ref"])
def test_unchecked_pooling_equals_checked_and_still_refuses_a_non_finite_pooled_value(kind, backend):
    hidden, sel = pool_inputs(4, 9, 8, kind)
    if kind == "mean":
        hidden[~sel["mask"]] = float("nan")   # padding may hold anything, checked or not
    else:
        sel = {"positions": sel["positions"] % hidden.shape[1]}   # the unchecked path takes [0, T)
    assert torch.equal(pool(hidden, backend=backend, checked=False, **sel), pool(hidden, backend=backend, **sel))
    row = 1
    bad = hidden.clone()
    if kind == "mean":
        bad[row, sel["mask"][row].nonzero()[0, 0]] = float("inf")
    else:
        bad[row, sel["positions"][row]] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf at a (pooled position|position where mask is set)"):
        pool(bad, backend=backend, checked=False, **sel)


def test_pool_chunk_size_comes_from_the_environment(monkeypatch):
    import tte_kernels.pooling as mod
    calls = []
    real = mod.PoolChunked.apply
    monkeypatch.setattr(mod.PoolChunked, "apply", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setenv("TTE_POOL_CHUNK", "3")
    hidden, sel = pool_inputs(2, 9, 8, "mean")
    pool(hidden, backend="chunked", **sel)
    assert calls == [3]


def test_environment_forces_ref_through_pool(monkeypatch):
    import tte_kernels.pooling as mod
    seen = []
    monkeypatch.setattr(mod, "pool_ref", lambda *a, **k: seen.append("ref") or pool_ref(*a, **k))
    monkeypatch.setenv("TTE_KERNEL_BACKEND", "ref")
    hidden, sel = pool_inputs(2, 9, 8, "last")
    pool(hidden, **sel)
    assert seen == ["ref"]


def test_pool_triton_backend_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, sel = pool_inputs(2, 9, 8, "last")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        pool(hidden, backend="triton", **sel)


# --- bad input --------------------------------------------------------------------------------

def _bad_inputs():
    h = torch.randn(3, 5, 8)
    pos = torch.tensor([4, 0, 2])
    mask = torch.ones(3, 5, dtype=torch.bool)
    nan_at_pos = h.clone()
    nan_at_pos[1, 0, 3] = float("nan")
    return [
        ("hidden_not_3d", dict(hidden=h[0], positions=pos), ValueError, r"hidden must be \[B, T, D\]"),
        ("hidden_int", dict(hidden=h.long(), positions=pos), TypeError, "hidden has dtype torch.int64"),
        ("hidden_list", dict(hidden=h.tolist(), positions=pos), TypeError, "hidden must be a torch.Tensor"),
        ("neither", dict(hidden=h), ValueError, "exactly one of positions"),
        ("both", dict(hidden=h, positions=pos, mask=mask), ValueError, "exactly one of positions"),
        ("position_out_of_range", dict(hidden=h, positions=torch.tensor([5, 0, 1])), ValueError,
         r"positions must lie in \[-T, T\)"),
        ("position_float", dict(hidden=h, positions=pos.float()), TypeError, "positions has dtype"),
        ("position_count", dict(hidden=h, positions=pos[:2]), ValueError, "positions has 2 entries"),
        ("mask_shape", dict(hidden=h, mask=mask[:, :4]), ValueError, r"mask has shape \(3, 4\)"),
        ("mask_values", dict(hidden=h, mask=mask.long() * 2), ValueError, "mask must hold only 0 and 1"),
        ("nan_at_pooled_position", dict(hidden=nan_at_pos, positions=pos), ValueError, "NaN or Inf at a pooled"),
        ("nan_under_mask", dict(hidden=nan_at_pos, mask=mask), ValueError, "NaN or Inf at a position where mask"),
        ("positions_on_other_device", dict(hidden=h, positions=pos.to("meta")), ValueError, "positions is on meta"),
        ("mask_on_other_device", dict(hidden=h, mask=mask.to("meta")), ValueError, "mask is on meta"),
    ]


@pytest.mark.parametrize("kwargs,error,message", [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()])
@pytest.mark.parametrize("backend", ["chunked", "ref", "triton"])
def test_bad_pool_input_is_rejected_before_any_kernel_with_a_clear_error(monkeypatch, kwargs, error, message, backend):
    import tte_kernels.pooling as mod

    def must_not_run(*a, **k):
        raise AssertionError("a kernel ran on bad input")

    for name in ("pool_ref", "pool_chunked"):
        monkeypatch.setattr(mod, name, must_not_run)
    with pytest.raises(error, match=message):
        pool(**kwargs, backend=backend)
