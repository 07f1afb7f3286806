"""The embed step's own fast path against its plain twins: the fused LoRA product (think and embed
as one low-rank product per layer, embed only on the invocation columns) against PEFT's forward
with the per-position gate, and the static invocation step (what the CUDA graph replays) against
the eager feed of the DynamicCache; embeddings to 1e-6 in fp32, gradients too. CPU here; the
CUDA-graph invocation step in tests/gpu/test_gpu_decode.py.

    pytest tests/test_embed_step.py -q
"""
import pytest
import torch

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.model import adapters
from unified_tte.model.zoo import tiny_llama, tiny_qwen2vl
from unified_tte.testing import randomize_adapters, solid_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-6


def rows(builder):
    images = builder is tiny_qwen2vl
    return [TTEInput("Which digit is shown?", [solid_image(56, 56)] if images else []),
            TTEInput("Describe the number seven in a few careful words.", [solid_image(84, 56)] if images else []),
            TTEInput("no")]


def decoded(builder, invocation=("<|embed|>",), **config):
    """A model and a decoded state in which rows stopped at different steps, so their pending
    tokens differ in number (the end-of-turn alone, or the last token and the end-of-turn)."""
    tte = UnifiedTTE(builder(), mode="activated", invocation=invocation, **config).eval()
    randomize_adapters(tte, std=0.15, seed=1)
    inputs = rows(builder)
    tte.stop_ids = {tte.eos_id, tte.think(inputs, max_new_tokens=8).traces[0].token_ids[3]}
    out = tte.think(inputs, max_new_tokens=9)
    assert len({len(p) for p in out.state.pending}) > 1
    return tte, inputs, out


def gated_embed(tte, state):
    """The embed step as PEFT runs it: both adapters through PEFT's own LoRA forward, the embed
    adapter's output multiplied by a 0/1 gate on every projection (1 on the invocation)."""
    n_inv = len(tte.invocation_ids)
    chunks = [p + tte.invocation_ids for p in state.pending]
    width = max(len(c) for c in chunks)
    gate = torch.zeros(len(chunks), width, 1)
    gate[:, width - n_inv:] = 1.0
    with tte.engine.preserved(state), tte.switch.use(tte.embed_adapters, gate):
        hidden = tte.engine.feed(state, chunks, tte.num_layers)
    return tte._pool(tte.stack.norm(hidden), n_inv)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2vl], ids=["llama", "qwen2vl"])
@pytest.mark.parametrize("invocation", [("<|embed|>",), ("<|embed|>", "<|embed2|>")], ids=["inv1", "inv2"])
def test_the_fused_embed_step_equals_peft_with_the_gate(builder, invocation):
    tte, inputs, out = decoded(builder, invocation, pooling="mean" if len(invocation) > 1 else "last")
    with torch.no_grad():
        fused = tte.embed_from_state(out.state)
        assert tte.engine.last_invocation_mode == "eager"
        assert (fused - gated_embed(tte, out.state)).abs().max() <= TOL
        # the embed adapter matters on the invocation only: zeroing it changes the embedding
        assert (fused - tte.embed_recompute(inputs, out.traces)).abs().max() <= 1e-5


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2vl], ids=["llama", "qwen2vl"])
def test_the_static_invocation_step_equals_the_eager_feed_and_leaves_the_state(builder):
    tte, inputs, out = decoded(builder)
    state = out.state
    before = (state.cache.get_seq_length(), state.attention_mask.clone(), len(state.positions),
              [list(p) for p in state.pending])
    with torch.no_grad():
        eager = tte.embed_from_state(state)
        tte.engine.decode_mode = "static"
        static = tte.embed_from_state(state)
        assert tte.engine.last_invocation_mode == "static"
        again = tte.embed_from_state(state)
    assert (static - eager).abs().max() <= TOL and torch.equal(static, again)
    assert len(tte.engine._invocation_steps) == 1        # the same shape reuses its buffers
    after = (state.cache.get_seq_length(), state.attention_mask, len(state.positions), state.pending)
    assert after[0] == before[0] and torch.equal(after[1], before[1]) and after[2:] == before[2:]
    # The direct embedding (no pending token, the invocation alone) takes the same path.
    both = tte.embed_both(inputs, max_new_tokens=5)
    assert (both.direct - tte.embed_recompute(inputs)).abs().max() <= 1e-5
    assert (both.tte - tte.embed_recompute(inputs, both.traces)).abs().max() <= 1e-5


def test_the_embed_step_sees_adapter_weights_changed_in_place():
    """The fused product keeps its stacked weights between calls; an in-place change of an adapter
    (an optimizer step, a load) must reach the next embedding, in the eager and the static path."""
    tte, inputs, out = decoded(tiny_llama)
    with torch.no_grad():
        for mode in ("eager", "static"):
            tte.engine.decode_mode = mode
            first = tte.embed_from_state(out.state)
            randomize_adapters(tte, std=0.15, seed=7 if mode == "eager" else 8, adapters=("embed",))
            second = tte.embed_from_state(out.state)
            assert (second - first).abs().max() > 1e-3
            assert (second - gated_embed(tte, out.state)).abs().max() <= TOL


def test_fused_gradients_equal_the_gated_path():
    tte, inputs, out = decoded(tiny_llama)
    params = tte.set_trainable("embed")
    weights = torch.randn(3, tte.stack.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def grads(embed):
        for p in params:
            p.grad = None
        # a state of its own: an embed step with grad leaves autograd history in its cache
        state = tte.think(inputs, max_new_tokens=9).state
        (embed(state) * weights).sum().backward()
        return [p.grad.clone() for p in params]

    fused, gated = grads(tte.embed_from_state), grads(lambda s: gated_embed(tte, s))
    assert tte.engine.last_invocation_mode == "eager"    # with grad, never the static step
    # fp32 rounding of two summation orders, relative to the gradients' size
    scale = max(b.abs().max() for b in gated)
    assert max((a - b).abs().max() for a, b in zip(fused, gated)) <= 1e-5 * scale
    assert all(g.abs().max() > 0 for g in fused)


def test_with_lora_dropout_in_train_mode_the_embed_step_is_peft_with_the_gate():
    """Dropout draws a different mask for each adapter's input, which one stacked product cannot
    do: `fused` then runs PEFT's own forward and gate, drawing the same random numbers."""
    tte, inputs, out = decoded(tiny_llama, lora_dropout=0.5)
    adapters.dropout_train_mode(tte.peft_model, "embed")
    with torch.no_grad():
        torch.manual_seed(0)
        fused = tte.embed_from_state(out.state)
        torch.manual_seed(0)
        gated = gated_embed(tte, out.state)
    assert torch.equal(fused, gated)
    tte.peft_model.eval()
    with torch.no_grad():
        assert (tte.embed_from_state(out.state) - fused).abs().max() > 1e-3   # dropout was applied


@pytest.mark.parametrize("width", [1, 3])
def test_grouped_sdpa_equals_transformers_sdpa_with_repeated_heads(width):
    """The decode and invocation steps' attention (no copy of the cache per query-head group)
    against transformers' own: 9 query heads on 3 key/value heads, two rows, masks with holes."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from unified_tte.model.backbones import grouped_sdpa_attention

    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, width, 9, 16, generator=gen).transpose(1, 2)   # as the layers hand it over
    key, value = torch.randn(2, 3, 40, 16, generator=gen), torch.randn(2, 3, 40, 16, generator=gen)
    mask = torch.rand(2, 1, width, 40, generator=gen) > 0.3
    mask[..., -1] = True
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    ours, _ = grouped_sdpa_attention(module, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (2, width, 9, 16)
    assert (ours - theirs).abs().max() <= 1e-6


def test_the_invocation_step_runs_grouped_attention_and_restores_sdpa(monkeypatch):
    from unified_tte.model import backbones

    calls = []
    real = backbones.grouped_sdpa_attention
    monkeypatch.setattr(backbones, "grouped_sdpa_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    tte, inputs, out = decoded(tiny_llama)
    assert tte.stack.config.num_key_value_heads < tte.stack.config.num_attention_heads   # grouped-query
    for mode in ("eager", "static"):
        tte.engine.decode_mode = mode
        calls.clear()
        with torch.no_grad():
            emb = tte.embed_from_state(out.state)
        assert len(calls) == tte.num_layers
        assert (emb - tte.embed_recompute(inputs, out.traces)).abs().max() <= 1e-5
        assert tte.stack.attn_implementation == "sdpa"


def test_a_peft_lora_variant_is_refused_by_the_switch():
    """The fused product is plain LoRA; an adapter PEFT runs as a variant (aLoRA here) is refused."""
    from peft import LoraConfig, get_peft_model

    backbone = tiny_llama()
    peft_model = get_peft_model(backbone.model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                                           alora_invocation_tokens=[5]), adapter_name="embed")
    with pytest.raises(adapters.AdapterError, match="PEFT LoRA variant"):
        adapters.AdapterSwitch(peft_model, [])
