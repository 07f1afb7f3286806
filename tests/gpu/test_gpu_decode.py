"""The CUDA-graph decode loop against the eager loop: the same tokens, the same state, the same
embedding afterwards, in fp32 (tiny models and the Qwen2-VL-2B shape). In bf16 the two loops may
part ways on a near-tie (CUDA's attention kernels split a longer, masked static cache differently),
so there the graph loop's state is held to the recompute path instead. The compiled loop (inductor,
replayed as a CUDA graph) against the eager loop, and the graph-replayed embed step (the invocation
step) against the eager feed. The CPU twins (static == eager, compiled == eager, the static
invocation step): tests/test_decode.py, tests/test_embed_step.py. Skipped without CUDA.
"""
import pytest
import torch

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.model import zoo
from unified_tte.testing import randomize_adapters, solid_image

pytestmark = pytest.mark.gpu


def inputs_for(builder, big=112):
    images = builder is not zoo.tiny_llama
    return [TTEInput("Which digit is shown?", [solid_image(56, 56)] if images else []),
            TTEInput("Describe the number seven in a few careful words.", [solid_image(big, 84)] if images else []),
            TTEInput("no")]


def decode(make, builder, mode, loop, dtype, new_tokens=12):
    tte = make()
    inputs = inputs_for(builder)
    tte.engine.decode_mode = "eager"
    tte.stop_ids = {tte.eos_id, tte.think(inputs, max_new_tokens=8).traces[0].token_ids[3]}
    tte.engine.decode_mode = loop
    out = tte.think(inputs, max_new_tokens=new_tokens)
    assert tte.engine.last_decode_mode == loop
    return tte, out


def make_tiny(builder, mode, dtype):
    def make():
        tte = UnifiedTTE(builder(), mode=mode, embed_layers=2)
        randomize_adapters(tte, std=0.15 if dtype == torch.float32 else 0.05, seed=1)
        return tte.to(device="cuda", dtype=dtype).eval()
    return make


BUILDERS = [zoo.tiny_qwen2vl, zoo.tiny_qwen25vl, zoo.tiny_llama]


@pytest.mark.parametrize("mode", ["activated", "top_k"])
@pytest.mark.parametrize("builder", BUILDERS, ids=["qwen2vl", "qwen25vl", "llama"])
def test_cuda_graph_decode_equals_the_eager_loop_fp32(builder, mode):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    eager_tte, eager = decode(make_tiny(builder, mode, torch.float32), builder, mode, "eager", torch.float32)
    graph_tte, graph = decode(make_tiny(builder, mode, torch.float32), builder, mode, "graph", torch.float32)
    assert [t.token_ids for t in graph.traces] == [t.token_ids for t in eager.traces]
    assert len({len(t.token_ids) for t in eager.traces}) > 1, "rows should stop at different lengths"
    assert torch.equal(graph.state.attention_mask, eager.state.attention_mask)
    diff = (graph_tte.embed_from_state(graph.state) - eager_tte.embed_from_state(eager.state)).abs().max()
    assert diff <= 1e-5


@pytest.mark.parametrize("mode", ["activated", "top_k"])
@pytest.mark.parametrize("builder", BUILDERS, ids=["qwen2vl", "qwen25vl", "llama"])
def test_cuda_graph_decode_state_is_consistent_in_bf16(builder, mode):
    tte, graph = decode(make_tiny(builder, mode, torch.bfloat16), builder, mode, "graph", torch.bfloat16)
    emb = tte.embed_from_state(graph.state)
    recompute = tte.embed_recompute(inputs_for(builder), graph.traces)
    assert torch.nn.functional.cosine_similarity(emb, recompute, dim=-1).min() >= 0.999


def test_cuda_graph_decode_on_the_2b_shape():
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    backbone = zoo.load("qwen2vl-2b-shape", dtype=torch.float32, device="cuda")
    tte = UnifiedTTE(backbone, mode="activated")
    randomize_adapters(tte, std=0.02, seed=1)
    tte.to(device="cuda").eval()
    inputs = inputs_for(zoo.tiny_qwen2vl, big=448)
    tokens, embeddings = {}, {}
    for loop in ("eager", "graph"):
        tte.engine.decode_mode = loop
        out = tte.think(inputs, max_new_tokens=16, min_new_tokens=16)
        tokens[loop] = [t.token_ids for t in out.traces]
        assert tte.engine.last_decode_mode == loop
        with torch.no_grad():
            embeddings[loop] = tte.embed_from_state(out.state)
        assert tte.engine.last_invocation_mode == loop
    assert tokens["graph"] == tokens["eager"]
    assert (embeddings["graph"] - embeddings["eager"]).abs().max() <= 1e-5


@pytest.mark.parametrize("builder", BUILDERS, ids=["qwen2vl", "qwen25vl", "llama"])
def test_the_graph_replayed_embed_step_equals_the_eager_feed_fp32(builder):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    tte, out = decode(make_tiny(builder, "activated", torch.float32), builder, "activated", "eager", torch.float32)
    assert len({len(p) for p in out.state.pending}) > 1   # rows with one and with two pending tokens
    with torch.no_grad():
        eager = tte.embed_from_state(out.state)
        tte.engine.decode_mode = "graph"
        graph = tte.embed_from_state(out.state)
        assert tte.engine.last_invocation_mode == "graph"
        again = tte.embed_from_state(out.state)             # replayed, not captured again
        assert len(tte.engine._invocation_steps) == 1
        assert (graph - eager).abs().max() <= 1e-5 and torch.equal(graph, again)
        # weights changed in place: a new capture, the new weights' embedding
        randomize_adapters(tte, std=0.15, seed=9, adapters=("embed",))
        changed = tte.embed_from_state(out.state)
        tte.engine.decode_mode = "eager"
        assert (changed - tte.embed_from_state(out.state)).abs().max() <= 1e-5
        assert (changed - graph).abs().max() > 1e-3
        tte.engine.decode_mode = "graph"
        both = tte.embed_both(inputs_for(builder), max_new_tokens=6)   # the direct embedding too
    assert (both.direct - tte.embed_recompute(inputs_for(builder))).abs().max() <= 1e-5
    assert (both.tte - tte.embed_recompute(inputs_for(builder), both.traces)).abs().max() <= 1e-5


@pytest.mark.parametrize("builder", [zoo.tiny_qwen2vl, zoo.tiny_llama], ids=["qwen2vl", "llama"])
def test_compiled_decode_equals_the_eager_loop_on_cuda_fp32(builder):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    eager_tte, eager = decode(make_tiny(builder, "activated", torch.float32), builder, "activated", "eager",
                              torch.float32)
    compiled_tte, compiled = decode(make_tiny(builder, "activated", torch.float32), builder, "activated",
                                    "compiled", torch.float32)
    assert [t.token_ids for t in compiled.traces] == [t.token_ids for t in eager.traces]
    with torch.no_grad():
        emb = compiled_tte.embed_from_state(compiled.state)
        assert compiled_tte.engine.last_invocation_mode == "compiled"
        assert (emb - eager_tte.embed_from_state(eager.state)).abs().max() <= 1e-5


def test_auto_picks_the_graph_loop_on_cuda():
    tte = UnifiedTTE(zoo.tiny_llama()).to("cuda")
    tte.think([TTEInput("x")], max_new_tokens=4)
    assert tte.engine.last_decode_mode == "graph"
