"""Every attention implementation gives the same fast path: eager == sdpa on CPU, and the
flash-attention 2 route through transformers' own integration (mask -> unpadding -> varlen
kernel) with the kernels replaced by a plain PyTorch stand-in that follows flash-attn's documented
contract (causal diagonal aligned bottom-right when queries are fewer than keys, flash-attn >= 2.1).
That checks what the hand-written layer loop passes for left padding, masked pads in the middle of
a decode, the invocation step and top_k's re-run over cached residuals; the real kernels run in
tests/gpu/test_gpu_attention.py.

    pytest tests/test_attention.py -q
"""
import pytest
import torch

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.errors import UnsupportedBackbone
from unified_tte.model import backbones
from unified_tte.model.zoo import tiny_llama, tiny_qwen2vl, tiny_qwen25vl
from unified_tte.testing import randomize_adapters, solid_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5


def vl_batch():
    return [TTEInput("Which digit is shown?", [solid_image(56, 56)]),
            TTEInput("Describe both pictures, the wide one first, in a few careful words.",
                     [solid_image(112, 84, (20, 160, 40)), solid_image(56, 56, (10, 10, 200))]),
            TTEInput("no image")]


def text_batch():
    return [TTEInput("Which digit is shown?"),
            TTEInput("Describe the number seven in a few careful and exact words."), TTEInput("no")]


BUILDERS = [pytest.param(tiny_qwen2vl, vl_batch, id="qwen2vl"),
            pytest.param(tiny_qwen25vl, vl_batch, id="qwen25vl"),
            pytest.param(tiny_llama, text_batch, id="llama")]


def make(builder, mode, attn="sdpa"):
    tte = UnifiedTTE(builder(attn_implementation=attn), mode=mode, embed_layers=2)
    randomize_adapters(tte, std=0.15, seed=1)
    return tte


def run(tte, inputs):
    """think_then_embed with row 0 stopping after 3 tokens (masked pads mid-decode), then embed
    with given traces and without (candidates)."""
    first = tte.think(inputs, max_new_tokens=8).traces[0].token_ids
    tte.stop_ids = {tte.eos_id, first[3]}
    emb, traces = tte.think_then_embed(inputs, max_new_tokens=8)
    given = ["<think>three</think> three", "<think>seven, so eight</think> eight", ""]
    return emb, [t.token_ids for t in traces], tte.embed(inputs, given), tte.embed(inputs)


@pytest.mark.parametrize("mode", ["activated", "top_k"])
@pytest.mark.parametrize("builder,batch", BUILDERS)
def test_eager_and_sdpa_give_the_same_fast_path(builder, batch, mode):
    eager, sdpa = run(make(builder, mode, "eager"), batch()), run(make(builder, mode, "sdpa"), batch())
    assert eager[1] == sdpa[1], "decoded tokens differ"
    assert len({len(t) for t in eager[1]}) > 1, "rows should stop at different lengths"
    for a, b in zip((eager[0], *eager[2:]), (sdpa[0], *sdpa[2:])):
        assert (a - b).abs().max() <= TOL


# ---------------------------------------------------------------------------- flash-attention 2
def _attend(q, k, v, scale, causal):
    """q [Sq, H, d], k/v [Sk, Hk, d] -> [Sq, H, d]; GQA by repeating kv heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        sq, sk = q.shape[0], k.shape[0]
        allowed = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)  # bottom-right
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, deterministic=False):
    """flash_attn.flash_attn_func's contract: q [B, Sq, H, d], k/v [B, Sk, Hk, d]."""
    scale = softmax_scale or q.shape[-1] ** -0.5
    return torch.stack([_attend(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, deterministic=False):
    """flash_attn.flash_attn_varlen_func's contract: sequences packed along dim 0."""
    scale = softmax_scale or q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        if cq[b + 1] > cq[b]:
            out[cq[b]:cq[b + 1]] = _attend(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
                                           scale, causal)
    return out


@pytest.fixture
def flash_stand_in(monkeypatch):
    """Route transformers' flash_attention_2 to the PyTorch stand-in above. The stand-in computes in
    fp32, so the half-precision rule of the real kernels is lifted for the test."""
    fa = pytest.importorskip("transformers.modeling_flash_attention_utils")
    if not hasattr(fa, "_lazy_imports") or not hasattr(fa, "_loaded_implementation"):
        pytest.skip("transformers' flash-attention loader changed; update the stand-in")
    monkeypatch.setattr(fa, "_lazy_imports", lambda *a, **k: (flash_attn_func, flash_attn_varlen_func, None,
                                                                fa._pad_input, fa._unpad_input))
    monkeypatch.setattr(fa, "_loaded_implementation", None)
    monkeypatch.setattr(backbones, "HALF_DTYPES", (torch.bfloat16, torch.float16, torch.float32))
    yield
    fa._loaded_implementation = None


def use_flash_stand_in(tte):
    tte.backbone.model.config._attn_implementation = "flash_attention_2"  # every sub-config
    assert tte.stack.attn_implementation == "flash_attention_2"


@pytest.mark.parametrize("mode", ["activated", "top_k"])
@pytest.mark.parametrize("builder,batch", BUILDERS)
def test_flash_attention_2_padding_contract_gives_the_same_fast_path(builder, batch, mode, flash_stand_in):
    sdpa = run(make(builder, mode), batch())
    tte = make(builder, mode)
    use_flash_stand_in(tte)
    flash = run(tte, batch())
    assert tte.engine.last_decode_mode == "eager"
    assert flash[1] == sdpa[1], "decoded tokens differ"
    for a, b in zip((flash[0], *flash[2:]), (sdpa[0], *sdpa[2:])):
        assert (a - b).abs().max() <= TOL
    # and the recompute path under flash-attention 2 (transformers' own forward) agrees too
    traces = ["<think>three</think> three", "<think>seven, so eight</think> eight", ""]
    assert (tte.embed_recompute(batch(), traces) - flash[2]).abs().max() <= TOL
    # one row: no padding anywhere, so the non-varlen kernel runs (causal with fewer queries)
    one = batch()[1:2]
    plain = make(builder, mode)
    tte.stop_ids = plain.stop_ids  # run() added a stop token
    reference = plain.think_then_embed(one, max_new_tokens=4)[0]
    assert (tte.think_then_embed(one, max_new_tokens=4)[0] - reference).abs().max() <= TOL


def test_flash_attention_2_is_refused_where_it_cannot_run():
    if not backbones.flash_attention_installed():
        with pytest.raises(UnsupportedBackbone, match="needs the flash-attn package"):
            backbones.attention_implementation("flash_attention_2", "cuda", torch.bfloat16)
    with pytest.raises(UnsupportedBackbone, match="attention implementation 'flash'"):
        backbones.attention_implementation("flash")
    assert backbones.attention_implementation(None, "cpu", torch.bfloat16) == "sdpa"
    assert backbones.attention_implementation("eager", "cpu") == "eager"


def test_flash_attention_2_refuses_fp32_weights(flash_stand_in, monkeypatch):
    """The real kernels run in bf16/fp16 only: a model left in (or cast back to) fp32 is refused
    with what to do, instead of failing inside the kernel."""
    monkeypatch.setattr(backbones, "HALF_DTYPES", (torch.bfloat16, torch.float16))
    tte = make(tiny_llama, "activated")
    use_flash_stand_in(tte)
    with pytest.raises(UnsupportedBackbone, match="bf16 or fp16 only"):
        tte.embed(text_batch())


def test_static_decode_needs_eager_or_sdpa(flash_stand_in):
    tte = make(tiny_llama, "activated")
    use_flash_stand_in(tte)
    tte.engine.decode_mode = "static"
    with pytest.raises(ValueError, match="eager and sdpa attention only"):
        tte.think(text_batch(), max_new_tokens=3)
