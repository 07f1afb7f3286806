"""UnifiedTTE's construction and adapter switch: no global side effects, PEFT variants it cannot
gate are refused, the PEFT versions the switch was checked against, and the public hooks the
benchmarks use (min_new_tokens, on_prefill, an embed step that leaves its state reusable)."""
import peft
import pytest
import torch
from peft import LoraConfig, get_peft_model

from unified_tte import TTEConfig, TTEInput, UnifiedTTE
from unified_tte.model import adapters
from unified_tte.model.zoo import tiny_llama, tiny_qwen2vl
from unified_tte.testing import randomize_adapters, solid_image, until_stop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_installed_peft_is_one_the_switch_was_checked_against():
    assert adapters.peft_version_checked(), (
        f"PEFT {peft.__version__} is not in adapters.PEFT_VERSIONS_CHECKED {adapters.PEFT_VERSIONS_CHECKED}: "
        "re-run tests/test_forward_path.py and tests/test_adapters.py against it, then add it.")


def test_construction_leaves_the_callers_rng_and_config_alone():
    backbone = tiny_llama()
    config = TTEConfig(mode="top_k")
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tte = UnifiedTTE(backbone, config, lora_r=8)
    assert torch.equal(torch.rand(4), expected)
    assert config.embed_layers is None and config.lora_r == 16       # the caller's object
    assert tte.config.embed_layers == 1 and tte.config.lora_r == 8   # the filled-in copy


def test_lora_init_depends_on_the_config_seed_only():
    a = UnifiedTTE(tiny_llama(), seed=3).adapter_params("think")
    torch.manual_seed(999)
    b = UnifiedTTE(tiny_llama(), seed=3).adapter_params("think")
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    # ... and it does depend on it: another seed draws other weights (LoRA A is random, B is zero).
    c = UnifiedTTE(tiny_llama(), seed=4).adapter_params("think")
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_dora_is_refused_with_a_clear_error():
    model = tiny_llama().model
    dora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), adapter_name="think")
    with pytest.raises(adapters.AdapterError, match="DoRA"):
        adapters.AdapterSwitch(dora, ["think"])


def test_a_merged_embed_adapter_is_refused_at_the_switch():
    tte = UnifiedTTE(tiny_llama(), mode="activated")
    randomize_adapters(tte)
    for _, layer in adapters.lora_layers(tte.peft_model, "embed"):
        layer.merge(adapter_names=["embed"])
    with pytest.raises(adapters.AdapterError, match="merged"):
        tte.embed([TTEInput("a cat")])


def test_min_new_tokens_decodes_like_hf_generate():
    tte = UnifiedTTE(tiny_qwen2vl(), mode="activated")
    randomize_adapters(tte, std=0.15, seed=1)
    inputs = [TTEInput("Which digit?", [solid_image(56, 56)]), TTEInput("Name a number between one and nine.")]
    forced = tte.think(inputs, max_new_tokens=6, min_new_tokens=6)
    assert [len(t.token_ids) for t in forced.traces] == [6, 6]
    assert all(not (set(t.token_ids) & tte.stop_ids) for t in forced.traces)
    # Same rule as transformers: stop ids are masked before min_new_tokens.
    from unified_tte.model.inputs import left_pad, stack_images
    prompts = tte.encoder.encode(inputs)
    ids, mask = left_pad([p.ids for p in prompts], tte.pad_id)
    pixel_values, grid = stack_images(prompts)
    with tte.switch.use(tte.think_adapters):
        generated = tte.peft_model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid,
            mm_token_type_ids=(ids == tte.backbone.model.config.image_token_id).int(), max_new_tokens=6,
            min_new_tokens=4, do_sample=False, eos_token_id=sorted(tte.stop_ids), pad_token_id=tte.pad_id)
    ours = tte.think(inputs, max_new_tokens=6, min_new_tokens=4)
    for row, trace in enumerate(ours.traces):
        assert trace.token_ids == until_stop(generated[row, ids.shape[1]:].tolist(), tte.stop_ids)


def test_on_prefill_runs_once_between_the_prompt_and_the_first_token():
    tte = UnifiedTTE(tiny_llama())
    events = []
    prefill, decode = tte.engine.prefill, tte.engine.decode   # spies that call through
    tte.engine.prefill = lambda *a, **k: events.append("prefill") or prefill(*a, **k)
    tte.engine.decode = lambda *a, **k: events.append("decode") or decode(*a, **k)
    tte.think([TTEInput("hello")], max_new_tokens=3, on_prefill=lambda: events.append("on_prefill"))
    assert events == ["prefill", "on_prefill", "decode"]
    with pytest.raises(ValueError, match="min_new_tokens"):
        tte.think([TTEInput("hello")], max_new_tokens=3, min_new_tokens=4)


@pytest.mark.parametrize("mode", ["activated", "top_k"])
def test_the_embed_step_leaves_its_state_reusable(mode):
    tte = UnifiedTTE(tiny_qwen2vl(), mode=mode, embed_layers=2 if mode == "top_k" else None)
    randomize_adapters(tte, std=0.1)
    inputs = [TTEInput("a digit", [solid_image(56, 56)]), TTEInput("the number seven, written out")]
    state = tte.prefix_state(inputs, ["<think>x</think> y", "<think>seven</think> 7"])
    length, mask, n_pos = state.cache.get_seq_length(), state.attention_mask.clone(), len(state.positions)
    first = tte.embed_from_state(state)
    assert state.cache.get_seq_length() == length and torch.equal(state.attention_mask, mask)
    assert len(state.positions) == n_pos
    assert torch.equal(tte.embed_from_state(state), first)
    out = tte.think(inputs, max_new_tokens=4)
    assert torch.equal(tte.embed_from_state(out.state), tte.embed_from_state(out.state))


def test_a_separate_reasoner_has_no_embed_adapter():
    tte = UnifiedTTE.separate_reasoner(tiny_llama())
    assert not tte.adapter_params("embed") and tte.adapter_params("think")
    assert tte.think([TTEInput("hi")], max_new_tokens=2).traces
    with pytest.raises(ValueError, match="no embed adapter"):
        tte.embed([TTEInput("hi")])
