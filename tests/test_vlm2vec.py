"""prompt_format "vlm2vec": a VLM2Vec checkpoint (a merged folder, or a LoRA folder on its base)
as the two-model baseline's embedder gives what the reference computes: raw prompt with image
pad tokens, no chat markup, the last token pooled, vision tokens at 1D positions (as
transformers 4 gave prompts without <|vision_start|>); fast path == recompute path."""
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.errors import CheckpointError
from unified_tte.model.zoo import tiny_qwen2vl
from unified_tte.testing import solid_image

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def inputs():
    return [TTEInput("Represent the given image with the following question: what is shown?", [solid_image(56, 84)]),
            TTEInput("Find an image that matches the given text: a red square on a white wall")]


def vlm2vec_lora(tmp_path):
    """A VLM2Vec-style LoRA over the language model, saved as a PEFT folder; the live model too."""
    base = tiny_qwen2vl(seed=3).model
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(tmp_path / "lora")
    return model


def reference(model, backbone, items):
    """VLM2Vec's own computation for Qwen2-VL: processor-style ids of "<|image_pad|> text", right
    padding, the model's forward, the hidden state of each row's last real token, L2-normalised."""
    tok, proc = backbone.tokenizer, backbone.image_processor
    rows, pixels, grids = [], [], []
    for x in items:
        text = "<|image_pad|> " * len(x.images) + x.text
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if x.images:
            out = proc(images=x.images, return_tensors="pt")
            n = int(out["image_grid_thw"][0].prod()) // 4
            pad = tok.convert_tokens_to_ids("<|image_pad|>")
            ids = [t for i in ids for t in ([i] * n if i == pad else [i])]
            pixels.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        rows.append(ids)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids),
                       mm_token_type_ids=torch.zeros_like(ids), output_hidden_states=True).hidden_states[-1]
    last = hidden[torch.arange(len(rows)), mask.sum(1) - 1]
    return F.normalize(last.float(), dim=-1)


def test_a_vlm2vec_lora_folder_embeds_as_the_reference_computes(tmp_path, one_torch_thread):
    live = vlm2vec_lora(tmp_path)
    want = reference(live, tiny_qwen2vl(seed=3), inputs())
    tte = UnifiedTTE.vlm2vec_embedder(tiny_qwen2vl(seed=3), lora_folder=tmp_path / "lora")
    assert tte.invocation_ids == [] and "<|embed|>" not in tte.tokenizer.get_vocab()
    got = tte.embed(inputs())
    assert (got - want).abs().max() <= 1e-5
    assert (tte.embed_recompute(inputs()) - got).abs().max() <= 1e-5
    # the same vectors from the merged weights (a merged VLM2Vec folder loads as a plain backbone)
    merged = tiny_qwen2vl(seed=3)
    merged.model = live.merge_and_unload()
    assert (UnifiedTTE.vlm2vec_embedder(merged).embed(inputs()) - want).abs().max() <= 1e-5


def test_vlm2vec_prompts_carry_no_chat_markup_and_a_trace_is_raw_text():
    tte = UnifiedTTE.vlm2vec_embedder(tiny_qwen2vl())
    [p] = tte.encoder.encode([TTEInput("hello there")])
    assert tte.tokenizer.decode(p.ids) == "hello there"
    traces = ["<think>a square</think> square", "<think>red</think> red"]
    assert (tte.embed(inputs(), traces) - tte.embed_recompute(inputs(), traces)).abs().max() <= 1e-5


def test_vlm2vec_format_is_only_for_the_separate_embedder_and_checks_the_lora(tmp_path):
    with pytest.raises(ValueError, match="two-model baseline's embedder"):
        UnifiedTTE(tiny_qwen2vl(), prompt_format="vlm2vec")
    (tmp_path / "bad").mkdir()
    with pytest.raises(CheckpointError, match="not a PEFT LoRA folder"):
        UnifiedTTE.vlm2vec_embedder(tiny_qwen2vl(), lora_folder=tmp_path / "bad")
