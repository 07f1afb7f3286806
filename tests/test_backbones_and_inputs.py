"""Adapters, base weights, real weights and bad input, held against plain transformers + peft."""
import json
import warnings

import pytest
import torch

from unified_tte import InputError, TTEInput, UnifiedTTE
from unified_tte.errors import UnsupportedBackbone
from unified_tte.model.backbones import load, weight_hash
from unified_tte.model.inputs import left_pad
from unified_tte.model.zoo import tiny_llama, tiny_qwen2vl
from unified_tte.testing import randomize_adapters, solid_image


@pytest.mark.parametrize("builder", [tiny_qwen2vl, tiny_llama], ids=["qwen2vl", "llama"])
def test_fresh_embed_adapter_gives_the_think_models_own_hidden_state(builder, tmp_path):
    """A fresh embed LoRA is zero, so the activated embedding must be the think model's final
    hidden state at the invocation token — computed here with PeftModel.from_pretrained alone."""
    from peft import PeftModel

    tte = UnifiedTTE(builder(seed=3), mode="activated")
    randomize_adapters(tte, std=0.15, adapters=("think",))
    images = [solid_image(56, 84)] if builder is tiny_qwen2vl else []
    inputs = [TTEInput("Which digit is shown?", images), TTEInput("two")]
    emb, traces = tte.think_then_embed(inputs, max_new_tokens=5)
    tte.peft_model.save_pretrained(tmp_path, selected_adapters=["think"])

    plain = builder(seed=3)  # same random base, built again
    tok = plain.tokenizer
    tok.add_tokens(["<|embed|>"], special_tokens=True)  # the documented rule: mean row
    emb_layer = plain.model.get_input_embeddings()
    inv = tok.convert_tokens_to_ids("<|embed|>")
    with torch.no_grad():
        emb_layer.weight[inv] = emb_layer.weight[:inv].mean(0)
    peft_model = PeftModel.from_pretrained(plain.model, tmp_path / "think")
    for row, (x, trace) in enumerate(zip(inputs, traces)):
        prompt = tte.encoder.encode([x])[0]
        ids = torch.tensor([prompt.ids + trace.token_ids + [tok.eos_token_id, inv]])
        kwargs = {}
        if prompt.pixel_values is not None:
            kwargs = dict(pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                          mm_token_type_ids=(ids == plain.model.config.image_token_id).int())
        with torch.no_grad():
            hidden = peft_model.base_model.model.model(input_ids=ids, **kwargs).last_hidden_state
        expected = torch.nn.functional.normalize(hidden[0, -1].float(), dim=-1)
        assert (emb[row] - expected).abs().max() <= 1e-5, f"row {row}"


def test_switching_adapters_never_changes_base_weights():
    tte = UnifiedTTE(tiny_qwen2vl(), mode="top_k", embed_layers=2)
    randomize_adapters(tte, std=0.1)
    before = weight_hash(tte.peft_model)
    think_before = {n: p.detach().clone() for n, p in tte.adapter_params("think").items()}
    inputs = [TTEInput("a digit", [solid_image(56, 56)])]
    for _ in range(2):
        tte.think_then_embed(inputs, max_new_tokens=3)
        tte.embed(inputs, ["<think>x</think> y"])
        tte.embed_recompute(inputs, ["<think>x</think> y"])
        tte.set_trainable("embed")
        tte.embed_with_grad(inputs).sum().backward()
    assert weight_hash(tte.peft_model) == before
    think_after = tte.adapter_params("think")
    assert think_before and think_after.keys() == think_before.keys()
    assert all(torch.equal(p, think_before[n]) for n, p in think_after.items())
    # The embed step's backward reached the embed adapter only.
    assert all(p.grad is None for p in think_after.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tte.adapter_params("embed").values())


def test_set_trainable_selects_exactly_one_adapter():
    tte = UnifiedTTE(tiny_llama(), mode="activated")
    params = tte.set_trainable("embed")
    names = {n for n, p in tte.peft_model.named_parameters() if p.requires_grad}
    assert params and all(".embed." in n for n in names)
    assert names == set(tte.adapter_params("embed"))
    assert not tte.set_trainable(None)
    assert not any(p.requires_grad for p in tte.peft_model.parameters())  # not only an empty list returned


def test_unopenable_image_names_the_item_and_path(tmp_path):
    tte = UnifiedTTE(tiny_qwen2vl())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    inputs = [TTEInput("ok", [solid_image(56, 56)]), TTEInput("bad", [str(broken)])]
    with pytest.raises(InputError, match=r"input 1: cannot open image '.*broken\.png'"):
        tte.embed(inputs)
    with pytest.raises(InputError, match=r"input 0: cannot open image '.*missing\.jpg'"):
        tte.think([TTEInput("x", [str(tmp_path / "missing.jpg")])], max_new_tokens=2)


def test_images_on_a_text_only_backbone_are_refused():
    tte = UnifiedTTE(tiny_llama())
    with pytest.raises(InputError, match="text-only"):
        tte.embed([TTEInput("x", [solid_image(56, 56)])])


def test_too_long_input_cuts_the_end_of_the_text_with_a_warning():
    tte = UnifiedTTE(tiny_qwen2vl(), max_length=64)
    text = " ".join(["seven"] * 200)
    inputs = [TTEInput(text, [solid_image(56, 56)]), TTEInput("short")]
    with pytest.warns(UserWarning, match=r"input 0: prompt exceeds max_length=64 .* end of its text was cut"):
        emb, traces = tte.think_then_embed(inputs, max_new_tokens=8)
    with pytest.warns(UserWarning, match="input 0: prompt exceeds max_length=64"):
        prompt = tte.encoder.encode([inputs[0]], reserve=8 + 1 + 1)
    assert len(prompt[0].ids) + 8 + 2 <= 64
    image_id = tte.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert prompt[0].ids.count(image_id) == 4, "image tokens are never cut"
    assert tte.tokenizer.decode(prompt[0].ids).rstrip().endswith("assistant")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (emb - tte.embed_recompute(inputs, traces)).abs().max() <= 1e-5


def test_unsupported_backbone_type_is_refused_with_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedBackbone, match=r"'gpt2'.*supported types: qwen2_vl, qwen2_5_vl, llama"):
        load(tmp_path)
    from transformers import GPT2Config, GPT2LMHeadModel

    from unified_tte.model.backbones import Backbone
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedBackbone, match="supported types"):
        UnifiedTTE(Backbone(gpt2, tiny_llama().tokenizer, None, "gpt2"))


def test_load_reads_a_local_checkpoint_folder(tmp_path):
    bb = tiny_qwen2vl()
    bb.model.save_pretrained(tmp_path)
    bb.tokenizer.save_pretrained(tmp_path)
    bb.image_processor.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert loaded.model.config.model_type == "qwen2_vl"
    assert loaded.image_processor is not None
    assert weight_hash(loaded.model) == weight_hash(bb.model)
    inputs = [TTEInput("x", [solid_image(56, 56)])]
    a = UnifiedTTE(bb).embed(inputs)
    b = UnifiedTTE(loaded).embed(inputs)
    assert (a - b).abs().max() <= 1e-6


def test_left_pad_aligns_sequences_to_the_right():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_reuse_built_builds_a_builtin_once_and_hands_out_private_copies(monkeypatch):
    from unified_tte.model import zoo

    calls = []
    monkeypatch.setitem(zoo.BUILTIN, "tiny-llama", lambda **kw: calls.append(1) or tiny_llama(**kw))
    with zoo.reuse_built():
        a, b = zoo.load("tiny-llama"), zoo.load("tiny-llama")
        UnifiedTTE(a)   # wrapping adds a token and LoRA layers to a, in place
        assert len(calls) == 1 and len(b.tokenizer) == len(a.tokenizer) - 1
        assert weight_hash(b.model) == weight_hash(zoo.load("tiny-llama").model)
    zoo.load("tiny-llama")
    assert len(calls) == 2   # outside the block nothing is kept


def test_system_prompt_is_the_system_turn_of_every_prompt_and_travels_with_the_config(tmp_path):
    from unified_tte.export import export_model

    plain = UnifiedTTE(tiny_llama())
    system = UnifiedTTE(tiny_llama(), system_prompt="Be brief.")
    query = [TTEInput("What is seven plus two?")]
    default_ids = plain.encoder.encode(query)[0].ids
    ids = system.encoder.encode(query)[0].ids
    text = system.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is seven")
    assert "system" not in plain.tokenizer.decode(default_ids)   # None: the template's own default
    assert ids[-len(default_ids):] == default_ids                 # the user turn itself is unchanged
    randomize_adapters(system)
    export_model(system, tmp_path / "ck", dtype="fp32", backbone_spec="tiny-llama")
    reloaded = UnifiedTTE.from_checkpoint(tmp_path / "ck", backbone=tiny_llama())
    assert reloaded.config.system_prompt == "Be brief."
    assert reloaded.encoder.encode(query)[0].ids == ids
    assert (reloaded.embed(query) - system.embed(query)).abs().max() <= 1e-5


def test_image_size_rule_the_inputs_cap_then_the_models_range_then_the_processors():
    """UnifiedTTE.set_image_size states the rule; tiny_qwen2vl's processor caps at 112 x 112 px
    (16 image tokens), a 2 x 2 merge of 14 px patches makes one token per 28 x 28 px."""
    def image_tokens(tte, item):
        return tte.encoder.encode([item])[0].ids.count(tte.encoder.image_token_id)

    big, small = TTEInput("x", [solid_image(224, 224)]), TTEInput("x", [solid_image(28, 28)])
    tte = UnifiedTTE(tiny_qwen2vl())
    assert image_tokens(tte, big) == 16                                           # the processor's
    assert image_tokens(UnifiedTTE(tiny_qwen2vl(), max_pixels=56 * 56), big) == 4  # the config's
    tte.set_image_size(max_pixels=56 * 56)
    assert image_tokens(tte, big) == 4                                            # the setter's
    assert image_tokens(tte, TTEInput("x", big.images, max_pixels=84 * 84)) == 9   # the input's own cap wins
    tte.set_image_size(min_pixels=56 * 56)                                        # None keeps max_pixels
    assert image_tokens(tte, small) == 4 and image_tokens(tte, big) == 4
    assert tte.config.max_pixels is None          # the config keeps what the model was built with
