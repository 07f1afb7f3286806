"""The forward path on CUDA: fast == recompute in fp32 (tiny models and the Qwen2-VL-2B shape),
and bf16 within the flash-attention error budget (cosine >= 0.999 per row, fast-path error at most
twice the recompute path's own bf16 error against fp32). Skipped without CUDA.

    pytest tests/gpu -q
"""
import pytest
import torch
import torch.nn.functional as F

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.model import zoo
from unified_tte.testing import randomize_adapters, solid_image

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 here: no TF32 in matmuls or convolutions (the vision tower's patch embed)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def rows(big: int = 112):
    return [TTEInput("Which digit is shown?", [solid_image(big, big)]),
            TTEInput("Describe the picture in a few careful and exact words.", [solid_image(61, 93, (20, 160, 40))]),
            TTEInput("no image")]


def cuda_tte(backbone, mode, dtype=torch.float32, std=0.05):
    tte = UnifiedTTE(backbone, mode=mode, embed_layers=2 if backbone.name.startswith("tiny") else None)
    randomize_adapters(tte, std=std, seed=1)
    return tte.to(device="cuda", dtype=dtype).eval()


@pytest.mark.parametrize("mode", ["activated", "top_k"])
@pytest.mark.parametrize("builder", [zoo.tiny_qwen2vl, zoo.tiny_qwen25vl], ids=["qwen2vl", "qwen25vl"])
def test_fp32_fast_path_equals_recompute_on_cuda(builder, mode):
    tte = cuda_tte(builder(), mode)
    inputs = rows()
    emb, traces = tte.think_then_embed(inputs, max_new_tokens=8)
    assert emb.device.type == "cuda" and emb.dtype == torch.float32
    assert (emb - tte.embed_recompute(inputs, traces)).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["activated", "top_k"])
@pytest.mark.parametrize("builder", [zoo.tiny_qwen2vl, zoo.tiny_qwen25vl, zoo.tiny_llama],
                         ids=["qwen2vl", "qwen25vl", "llama"])
def test_bf16_fast_path_within_the_error_budget_on_cuda(builder, mode):
    reference = cuda_tte(builder(), mode)
    low = cuda_tte(builder(), mode, torch.bfloat16)
    inputs = rows() if builder is not zoo.tiny_llama else [TTEInput(r.text) for r in rows()]
    fast, traces = low.think_then_embed(inputs, max_new_tokens=8)
    recompute = low.embed_recompute(inputs, traces)
    ref32 = reference.embed_recompute(inputs, traces)
    assert fast.dtype == torch.float32
    assert F.cosine_similarity(fast, recompute, dim=-1).min() >= 0.999
    fast_err, own_err = (fast - ref32).abs().max(), (recompute - ref32).abs().max()
    assert fast_err <= 2 * own_err + 1e-6, (float(fast_err), float(own_err))


def test_qwen2vl_2b_shape_on_cuda_fp32_and_bf16():
    """The 2B shape, drawn on the GPU: fp32 fast == recompute on a 448 px image, an odd-sized one and
    a text-only row; then the same weights in bf16 within the budget."""
    tte = cuda_tte(zoo.load("qwen2vl-2b-shape", dtype=torch.float32, device="cuda"), "activated", std=0.02)
    inputs = rows(448)
    emb, traces = tte.think_then_embed(inputs, max_new_tokens=8)
    ref32 = tte.embed_recompute(inputs, traces)
    assert (emb - ref32).abs().max() <= 1e-5
    tte.to(torch.bfloat16)
    fast = tte.embed(inputs, traces)
    recompute = tte.embed_recompute(inputs, traces)
    assert F.cosine_similarity(fast, recompute, dim=-1).min() >= 0.999
    assert (fast - ref32).abs().max() <= 2 * (recompute - ref32).abs().max() + 1e-6
