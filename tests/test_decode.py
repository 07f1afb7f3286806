"""The decode loops hold each other equal: the static-cache loop (what the CUDA graph replays)
decodes the same tokens as the eager loop and leaves the same state, so the embed step that reuses
it gives the same embedding. CPU here; the CUDA-graph loop in tests/gpu/test_gpu_decode.py.

    pytest tests/test_decode.py -q
"""
import pytest
import torch

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.model.zoo import tiny_llama, tiny_qwen2vl, tiny_qwen25vl
from unified_tte.testing import randomize_adapters, solid_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def inputs_for(builder):
    images = builder is not tiny_llama
    return [TTEInput("Which digit is shown?", [solid_image(56, 56)] if images else []),
            TTEInput("Describe the number seven in a few careful words.", [solid_image(112, 84)] if images else []),
            TTEInput("no")]


def decode(builder, mode, decode_mode, **sampling):
    tte = UnifiedTTE(builder(), mode=mode, embed_layers=2)
    randomize_adapters(tte, std=0.15, seed=1)
    inputs = inputs_for(builder)
    tte.stop_ids = {tte.eos_id, tte.think(inputs, max_new_tokens=8).traces[0].token_ids[3]}
    tte.engine.decode_mode = decode_mode
    out = tte.think(inputs, max_new_tokens=9, **sampling)
    assert tte.engine.last_decode_mode == decode_mode
    return tte, out


@pytest.mark.parametrize("mode", ["activated", "top_k"])
@pytest.mark.parametrize("builder", [tiny_qwen2vl, tiny_qwen25vl, tiny_llama], ids=["qwen2vl", "qwen25vl", "llama"])
def test_static_cache_decode_equals_the_eager_loop(builder, mode):
    eager_tte, eager = decode(builder, mode, "eager")
    static_tte, static = decode(builder, mode, "static")
    assert [t.token_ids for t in static.traces] == [t.token_ids for t in eager.traces]
    assert [t.finished for t in static.traces] == [t.finished for t in eager.traces]
    assert len({len(t.token_ids) for t in eager.traces}) > 1, "rows should stop at different lengths"
    # the state the embed step reuses: mask, positions, lengths, cache (and top_k's residuals)
    a, b = eager.state, static.state
    assert torch.equal(a.attention_mask, b.attention_mask) and torch.equal(a.real_len, b.real_len)
    assert all(torch.equal(x, y) for x, y in zip(a.positions, b.positions)) and len(a.positions) == len(b.positions)
    assert a.cache.get_seq_length() == b.cache.get_seq_length() == a.attention_mask.shape[1]
    if mode == "top_k":
        # the unnormalised residual stream (magnitudes ~100): fp32 agreement relative to its size
        torch.testing.assert_close(torch.cat(b.residuals, 1), torch.cat(a.residuals, 1), rtol=1e-5, atol=1e-4)
    emb_eager, emb_static = eager_tte.embed_from_state(a), static_tte.embed_from_state(b)
    assert (emb_eager - emb_static).abs().max() <= 1e-5
    traces = static.traces
    assert (emb_static - static_tte.embed_recompute(inputs_for(builder), traces)).abs().max() <= 1e-5


def test_static_decode_samples_the_same_tokens_with_a_seed():
    _, eager = decode(tiny_llama, "activated", "eager", do_sample=True, temperature=1.5, seed=3)
    _, static = decode(tiny_llama, "activated", "static", do_sample=True, temperature=1.5, seed=3)
    assert [t.token_ids for t in static.traces] == [t.token_ids for t in eager.traces]


def test_decode_modes_are_checked():
    tte = UnifiedTTE(tiny_llama())
    tte.engine.decode_mode = "graph"
    with pytest.raises(ValueError, match="needs the model on CUDA"):
        tte.think([TTEInput("x")], max_new_tokens=3)
    tte.engine.decode_mode = "fast"
    with pytest.raises(ValueError, match="decode_mode must be one of"):
        tte.think([TTEInput("x")], max_new_tokens=3)
    tte.engine.decode_mode = "auto"
    tte.think([TTEInput("x")], max_new_tokens=3)
    assert tte.engine.last_decode_mode == "eager"  # auto on CPU: the eager loop


def test_auto_falls_back_to_the_eager_loop_when_the_graph_capture_fails(monkeypatch):
    """auto asks for the CUDA graph (simulated here on CPU); a capture that fails warns once and
    decodes eagerly, the same tokens; an explicit decode_mode="graph" raises instead."""
    from unified_tte.model import engine as engine_module

    def broken(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    _, eager = decode(tiny_llama, "activated", "eager")
    tte = UnifiedTTE(tiny_llama(), mode="activated", embed_layers=2)
    randomize_adapters(tte, std=0.15, seed=1)
    tte.stop_ids = {tte.eos_id, tte.think(inputs_for(tiny_llama), max_new_tokens=8).traces[0].token_ids[3]}
    monkeypatch.setattr(engine_module.StaticDecoder, "_capture", broken)
    monkeypatch.setattr(engine_module.Engine, "_static_decode_mode",
                        lambda self: "eager" if self._graph_failed else "graph")
    tte.engine.decode_mode = "auto"
    with pytest.warns(RuntimeWarning, match="capturing the decode step as a CUDA graph failed"):
        out = tte.think(inputs_for(tiny_llama), max_new_tokens=9)
    assert tte.engine.last_decode_mode == "eager" and tte.engine._graph_failed
    assert [t.token_ids for t in out.traces] == [t.token_ids for t in eager.traces]
    tte.engine.decode_mode = "graph"
    tte.engine._graph_failed = False
    with pytest.raises(RuntimeError, match="stream is capturing"):
        tte.think(inputs_for(tiny_llama), max_new_tokens=9)


@pytest.mark.slow  # torch.compile (inductor, C++ on CPU): tens of seconds per model
@pytest.mark.parametrize("builder,mode", [(tiny_llama, "activated"), (tiny_qwen2vl, "top_k")],
                         ids=["llama-activated", "qwen2vl-top_k"])
def test_compiled_decode_equals_the_eager_loop_and_keeps_logprobs(builder, mode):
    eager_tte, eager = decode(builder, mode, "eager", logprobs=True)
    compiled_tte, compiled = decode(builder, mode, "compiled", logprobs=True)
    assert [t.token_ids for t in compiled.traces] == [t.token_ids for t in eager.traces]
    assert len({len(t.token_ids) for t in eager.traces}) > 1, "rows should stop at different lengths"
    for a, b in zip(compiled.traces, eager.traces):
        assert a.answer_logprob == pytest.approx(b.answer_logprob, abs=1e-5)
    assert torch.equal(compiled.state.attention_mask, eager.state.attention_mask)
    with torch.no_grad():   # on CPU the embed step feeds the DynamicCache (engine.invocation_step)
        emb = compiled_tte.embed_from_state(compiled.state)
        if mode == "activated":
            assert compiled_tte.engine.last_invocation_mode == "eager"
        assert (emb - eager_tte.embed_from_state(eager.state)).abs().max() <= 1e-5
    assert (emb - compiled_tte.embed_recompute(inputs_for(builder), compiled.traces)).abs().max() <= 1e-5
    # a second decode of another shape compiles again, and is still the eager loop's
    again = compiled_tte.think(inputs_for(builder)[:2], max_new_tokens=5)
    assert [t.token_ids for t in again.traces] == [t.token_ids for t in eager_tte.think(inputs_for(builder)[:2],
                                                                                       max_new_tokens=5).traces]
