"""Thinking only where it helps: the direct embedding from the think prefill, the think gate and
the three policies (always / never / auto), each held to its plain twin (`embed_recompute`):
fp32, max abs diff <= 1e-5 on unit vectors, with images, padding and batches in which some rows
think and some do not."""
import pytest
import torch

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.errors import CheckpointError, InputError
from unified_tte.model.gate import ThinkGate, oracle, pick_compute, pick_quality, policy_curve
from unified_tte.model.zoo import tiny_llama, tiny_qwen2vl
from unified_tte.testing import randomize_adapters, solid_image

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def vl_batch():
    return [TTEInput("Which digit is shown?", [solid_image(56, 56)]),
            TTEInput("Describe both pictures, the wide one first, in a few careful words.",
                     [solid_image(84, 56, (20, 160, 40)), solid_image(56, 56, (10, 10, 200))]),
            TTEInput("no image"),
            TTEInput("A longer question with no picture at all, about the number seven and its friends.")]


def text_batch():
    return [TTEInput("Which digit is shown?"), TTEInput("Describe seven in a few careful and exact words."),
            TTEInput("no"), TTEInput("What is the capital of the country where Osaka is?")]


CASES = [pytest.param(tiny_qwen2vl, vl_batch, "activated", id="qwen2vl-activated"),
         pytest.param(tiny_qwen2vl, vl_batch, "top_k", id="qwen2vl-top_k"),
         pytest.param(tiny_llama, text_batch, "activated", id="llama-activated"),
         pytest.param(tiny_llama, text_batch, "top_k", id="llama-top_k")]


def make(builder, mode):
    tte = UnifiedTTE(builder(), mode=mode, embed_layers=2)
    randomize_adapters(tte, std=0.15, seed=1)
    return tte


class FixedGate(ThinkGate):
    """A gate fitted for `tte` whose decision on a batch is given: rows in `think_rows` score 0.9,
    the others 0.1, against the threshold 0.5 (the real scoring is ThinkGate's, tested below)."""

    def __init__(self, tte, think_rows: set[int], n_rows: int):
        n = 2 * tte.stack.config.hidden_size + 1
        super().__init__(torch.zeros(n), torch.tensor(0.0), torch.zeros(n), torch.ones(n),
                         {"fingerprint": tte.fingerprint(), "operating_point": "quality",
                          "operating_points": {"quality": {"threshold": 0.5}}})
        self.fixed = torch.tensor([0.9 if i in think_rows else 0.1 for i in range(n_rows)])

    def score(self, features):
        return self.fixed[:len(features)]


def splitting_gate(tte, inputs, think_rows: set[int]) -> ThinkGate:
    return FixedGate(tte, think_rows, len(inputs))


@pytest.mark.parametrize("builder,batch,mode", CASES)
def test_the_direct_embedding_from_the_think_prefill_equals_recompute_without_a_trace(builder, batch, mode):
    tte = make(builder, mode)
    inputs = batch()
    both = tte.embed_both(inputs, max_new_tokens=6)
    assert (both.direct - tte.embed_recompute(inputs, None)).abs().max() <= TOL
    assert (both.direct - tte.embed(inputs)).abs().max() <= TOL            # as candidates are embedded
    assert (both.tte - tte.embed_recompute(inputs, both.traces)).abs().max() <= TOL
    assert (both.direct - both.tte).abs().max() > 1e-3                       # the trace changes it
    assert both.features.shape == (len(inputs), 2 * tte.stack.config.hidden_size + 1)
    assert all(isinstance(t.answer_logprob, float) for t in both.traces)


@pytest.mark.parametrize("builder,batch,mode", CASES)
def test_a_mixed_batch_where_some_rows_think_equals_recompute(builder, batch, mode):
    tte = make(builder, mode)
    inputs = batch()
    tte.set_gate(splitting_gate(tte, inputs, think_rows={1, 3}))
    emb, traces = tte.think_then_embed(inputs, max_new_tokens=6, think="auto")
    assert [t.thought for t in traces] == [False, True, False, True]
    assert [t.used for t in traces] == ["direct", "tte", "direct", "tte"]
    assert traces[0].token_ids == [] and traces[1].token_ids
    recomputed = tte.embed_recompute(inputs, [t if t.thought else None for t in traces])
    assert (emb - recomputed).abs().max() <= TOL
    # the thinking rows decoded what the whole batch would have decoded for them
    always = tte.think(inputs, max_new_tokens=6).traces
    assert [traces[i].token_ids for i in (1, 3)] == [always[i].token_ids for i in (1, 3)]


def test_never_is_the_direct_embedding_and_decodes_nothing():
    tte = make(tiny_qwen2vl, "activated")
    inputs = vl_batch()
    emb, traces = tte.think_then_embed(inputs, max_new_tokens=6, think="never")
    assert not any(t.thought for t in traces) and all(t.token_ids == [] for t in traces)
    assert (emb - tte.embed_recompute(inputs, None)).abs().max() <= TOL


def test_auto_with_every_row_thinking_is_always_and_with_none_is_never():
    tte = make(tiny_llama, "activated")
    inputs = text_batch()
    always, _ = tte.think_then_embed(inputs, max_new_tokens=6, think="always")
    never, _ = tte.think_then_embed(inputs, max_new_tokens=6, think="never")
    tte.set_gate(splitting_gate(tte, inputs, think_rows={0, 1, 2, 3}))
    assert (tte.think_then_embed(inputs, max_new_tokens=6, think="auto")[0] - always).abs().max() <= TOL
    tte.set_gate(splitting_gate(tte, inputs, think_rows=set()))
    emb, traces = tte.think_then_embed(inputs, max_new_tokens=6, think="auto")
    assert (emb - never).abs().max() <= TOL and not any(t.thought for t in traces)


def test_the_answer_fallback_keeps_the_direct_embedding_of_an_unreliable_answer():
    tte = make(tiny_llama, "activated")
    inputs = text_batch()
    gate = splitting_gate(tte, inputs, think_rows={0, 1, 2, 3})
    both = tte.embed_both(inputs, max_new_tokens=6)
    logprobs = sorted(t.answer_logprob for t in both.traces)
    gate.info["answer_logprob_threshold"] = (logprobs[1] + logprobs[2]) / 2   # two rows fall back
    tte.set_gate(gate)
    tte.config.answer_fallback = True
    emb, traces = tte.think_then_embed(inputs, max_new_tokens=6, think="auto")
    low = {i for i, t in enumerate(both.traces) if t.answer_logprob < gate.info["answer_logprob_threshold"]}
    assert len(low) == 2 and all(t.thought for t in traces)
    assert {i for i, t in enumerate(traces) if t.used == "direct"} == low
    for i in range(len(inputs)):
        want = both.direct[i] if i in low else both.tte[i]
        assert (emb[i] - want).abs().max() <= TOL


def test_auto_without_a_gate_and_a_bad_policy_are_refused():
    tte = make(tiny_llama, "activated")
    with pytest.raises(InputError, match="needs a fitted think gate"):
        tte.think_then_embed(text_batch(), max_new_tokens=4, think="auto")
    with pytest.raises(InputError, match="think must be one of"):
        tte.think_then_embed(text_batch(), max_new_tokens=4, think="sometimes")
    with pytest.raises(ValueError, match="think_policy must be one of"):
        UnifiedTTE(tiny_llama(), think_policy="maybe")


def test_a_gate_fitted_for_another_model_is_refused():
    tte = make(tiny_llama, "activated")
    gate = splitting_gate(tte, text_batch(), think_rows={1})
    other_adapters = make(tiny_llama, "activated")
    randomize_adapters(other_adapters, std=0.15, seed=2)
    with pytest.raises(CheckpointError, match="other think/embed adapter weights"):
        other_adapters.set_gate(gate)
    other_config = UnifiedTTE(tiny_llama(), mode="top_k", embed_layers=2)
    with pytest.raises(CheckpointError, match="another model config"):
        other_config.set_gate(gate)
    other_base = UnifiedTTE(tiny_llama(seed=5), mode="activated", embed_layers=2)
    with pytest.raises(CheckpointError, match="another backbone"):
        other_base.set_gate(gate)


def test_a_gate_saves_and_loads_to_the_same_decisions(tmp_path):
    tte = make(tiny_llama, "activated")
    features = tte.embed_both(text_batch(), max_new_tokens=4).features
    n = features.shape[1]
    gate = ThinkGate(torch.randn(n, generator=torch.Generator().manual_seed(0)), torch.tensor(0.1),
                     features.mean(0), features.std(0) + 1e-3,
                     {"fingerprint": tte.fingerprint(), "operating_point": "quality",
                      "operating_points": {"quality": {"threshold": 0.5}, "compute": {"threshold": 0.7}}})
    loaded = ThinkGate.load(gate.save(tmp_path / "gate"))
    assert torch.equal(loaded.score(features), gate.score(features))
    assert torch.equal(loaded.decide(features, point="compute"), gate.decide(features, point="compute"))
    tte.set_gate(loaded)   # its fingerprint still matches the model
    (tmp_path / "gate" / "gate_config.json").write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="not a unified_tte.gate/1 file"):
        ThinkGate.load(tmp_path / "gate")


def test_the_policy_curve_spans_never_to_always_and_picks_its_operating_points():
    scores = [0.9, 0.8, 0.8, 0.3, 0.1]
    direct = [0.0, 1.0, 0.0, 1.0, 1.0]
    tte = [1.0, 1.0, 1.0, 0.0, 1.0]
    tokens = [10, 20, 30, 40, 0]
    curve = policy_curve(scores, direct, tte, tokens)
    assert (curve[0].think_rate, curve[0].accuracy) == (0.0, 0.6)      # never: the direct metric
    assert (curve[-1].think_rate, curve[-1].accuracy) == (1.0, 0.8)     # always: the TTE metric
    assert [p.think_rate for p in curve] == [0.0, 0.2, 0.6, 0.8, 1.0]  # the tied 0.8s think together
    best = pick_quality(curve)
    assert (best.think_rate, best.accuracy, best.token_fraction) == (0.6, 1.0, 0.6)
    assert sum(s > best.threshold for s in scores) == 3
    cheap = pick_compute(curve, token_budget=0.2)
    assert (cheap.think_rate, cheap.accuracy) == (0.2, 0.8)
    best_possible = oracle(direct, tte, tokens)
    assert best_possible.accuracy == 1.0 and best_possible.think_rate == 0.4
    with pytest.raises(InputError, match="token budget"):
        pick_compute(curve, 1.5)


@pytest.mark.parametrize("dtype,merge", [("fp32", False), ("bf16", False), ("fp32", True)])
def test_an_exported_auto_checkpoint_reloads_to_the_same_decisions_and_a_tampered_gate_is_refused(
        tmp_path, dtype, merge):
    from unified_tte.export import export_model

    tte = make(tiny_llama, "activated")
    inputs = text_batch()
    features = tte.embed_both(inputs, max_new_tokens=4).features
    n = features.shape[1]
    weight = torch.randn(n, generator=torch.Generator().manual_seed(0))
    scores = torch.sigmoid(((features - features.mean(0)) / (features.std(0) + 1e-3)) @ weight)
    threshold = float(scores.median())
    tte.set_gate(ThinkGate(weight, torch.tensor(0.0), features.mean(0), features.std(0) + 1e-3,
                           {"fingerprint": tte.fingerprint(), "operating_point": "quality",
                            "operating_points": {"quality": {"threshold": threshold}}}))
    tte.config.think_policy = "auto"
    folder = export_model(tte, tmp_path / "ck", dtype=dtype, merge_think=merge, backbone_spec="tiny-llama")
    reloaded = UnifiedTTE.from_checkpoint(folder, backbone=tiny_llama())
    assert reloaded.config.think_policy == "auto" and reloaded.gate is not None
    emb, traces = tte.think_then_embed(inputs, max_new_tokens=4)
    emb2, traces2 = reloaded.think_then_embed(inputs, max_new_tokens=4)
    assert 0 < sum(t.thought for t in traces) < len(inputs)
    if dtype == "fp32" and not merge:   # the same numbers; bf16 and a merged base round the weights
        assert [t.thought for t in traces2] == [t.thought for t in traces]
        assert torch.equal(emb, emb2)
    again, _ = UnifiedTTE.from_checkpoint(folder, backbone=tiny_llama()).think_then_embed(inputs, max_new_tokens=4)
    assert torch.equal(again, emb2)                                   # deterministic
    config = folder / "gate" / "gate_config.json"
    config.write_text(config.read_text().replace('"quality"', '"quality" ', 1))
    with pytest.raises(CheckpointError, match="gate/gate_config.json is"):
        UnifiedTTE.from_checkpoint(folder, backbone=tiny_llama())


def test_an_auto_checkpoint_without_its_gate_is_refused(tmp_path):
    from unified_tte.export import export_model

    tte = make(tiny_llama, "activated")
    tte.config.think_policy = "auto"
    folder = export_model(tte, tmp_path / "ck", backbone_spec="tiny-llama")
    with pytest.raises(CheckpointError, match="holds no gate"):
        UnifiedTTE.from_checkpoint(folder, backbone=tiny_llama())
