"""Attention implementations on CUDA: eager == sdpa on the fast path (fp32), and flash-attention 2
(when flash-attn is installed) against sdpa in bf16, through left padding, rows that stop early,
the invocation step and top_k's re-run over cached residuals. The CPU twin of the padding contract:
tests/test_attention.py. Skipped without CUDA (and the flash-attention cases without flash-attn).
"""
import pytest
import torch
import torch.nn.functional as F

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.model import zoo
from unified_tte.model.backbones import flash_attention_installed, set_attention
from unified_tte.testing import randomize_adapters, solid_image

pytestmark = pytest.mark.gpu

BUILDERS = [zoo.tiny_qwen2vl, zoo.tiny_qwen25vl, zoo.tiny_llama]


def batch(builder):
    images = builder is not zoo.tiny_llama
    return [TTEInput("Which digit is shown?", [solid_image(56, 56)] if images else []),
            TTEInput("Describe the number seven in a few careful words.", [solid_image(112, 84)] if images else []),
            TTEInput("no")]


def make(builder, mode, attn, dtype):
    tte = UnifiedTTE(builder(attn_implementation="sdpa" if attn == "flash_attention_2" else attn), mode=mode,
                     embed_layers=2)
    randomize_adapters(tte, std=0.05, seed=1)
    tte.to(device="cuda", dtype=dtype).eval()
    if attn == "flash_attention_2":
        set_attention(tte.backbone.model, attn)
    assert tte.stack.attn_implementation == attn
    return tte


def run(tte, inputs):
    first = tte.think(inputs, max_new_tokens=8).traces[0].token_ids
    tte.stop_ids = {tte.eos_id, first[3]}  # row 0 stops early: masked pads mid-decode
    emb, traces = tte.think_then_embed(inputs, max_new_tokens=8)
    given = ["<think>three</think> three", "<think>seven, so eight</think> eight", ""]
    return emb, [t.token_ids for t in traces], tte.embed(inputs, given), given


@pytest.mark.parametrize("mode", ["activated", "top_k"])
@pytest.mark.parametrize("builder", BUILDERS, ids=["qwen2vl", "qwen25vl", "llama"])
def test_eager_equals_sdpa_on_cuda(builder, mode):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    eager = run(make(builder, mode, "eager", torch.float32), batch(builder))
    sdpa = run(make(builder, mode, "sdpa", torch.float32), batch(builder))
    assert eager[1] == sdpa[1]
    assert (eager[0] - sdpa[0]).abs().max() <= 1e-5 and (eager[2] - sdpa[2]).abs().max() <= 1e-5


@pytest.mark.skipif(not flash_attention_installed(), reason="flash-attn is not installed")
@pytest.mark.parametrize("mode", ["activated", "top_k"])
@pytest.mark.parametrize("builder", BUILDERS, ids=["qwen2vl", "qwen25vl", "llama"])
def test_flash_attention_2_matches_sdpa_in_bf16(builder, mode):
    flash_tte = make(builder, mode, "flash_attention_2", torch.bfloat16)
    flash = run(flash_tte, batch(builder))
    sdpa = run(make(builder, mode, "sdpa", torch.bfloat16), batch(builder))
    # bf16 decodes may part ways on a near-tie, so compare embeddings of the same given traces
    assert F.cosine_similarity(flash[2], sdpa[2], dim=-1).min() >= 0.999
    recompute = flash_tte.embed_recompute(batch(builder), flash[3])
    assert F.cosine_similarity(flash[2], recompute, dim=-1).min() >= 0.999
    assert flash_tte.engine.last_decode_mode == "eager"  # the static loops need eager / sdpa masks
