"""The aLoRA export: with --merge-think in activated mode, plain transformers + PEFT serve the
exported embed adapter as an activated LoRA and reproduce UnifiedTTE's embeddings from one plain
forward over the same token ids (fp32, max abs diff <= 1e-5 on unit vectors): queries with traces
and candidates, a tiny Llama and a tiny Qwen2-VL with an image.

    pytest tests/test_alora_export.py -q
"""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.export import export_model, load_checkpoint, prepare_base
from unified_tte.model.inputs import left_pad, stack_images
from unified_tte.model.zoo import tiny_llama, tiny_qwen2vl
from unified_tte.testing import randomize_adapters, solid_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5
TRACES = ["<think>it is a three</think> three", "<think>seven, so eight</think> eight", ""]


def rows(images: bool):
    return [TTEInput("Which digit is shown?", [solid_image(56, 56)] if images else []),
            TTEInput("Describe the number seven in a few careful and exact words."),
            TTEInput("no")]


def plain_peft_embed(folder, builder, tte, inputs, traces, adapter_folder=None):
    """What a user without unified_tte's forward path runs: the base made to match the checkpoint,
    PEFT's own loader on embed/, one forward over prompt + trace + end-of-turn + invocation, the
    final hidden state (after the last norm) at the last token, L2-normalised."""
    from peft import PeftModel

    base = prepare_base(builder(), folder)
    plain = PeftModel.from_pretrained(base.model, str(adapter_folder or folder / "embed")).eval()
    prompts = tte.encode(inputs, traces)
    tails = tte.tails(len(inputs), traces)
    ids, mask = left_pad([p.ids + t + tte.invocation_ids for p, t in zip(prompts, tails)], tte.pad_id)
    extra = {}
    pixel_values, grid = stack_images(prompts)
    if pixel_values is not None:
        extra = dict(pixel_values=pixel_values, image_grid_thw=grid,
                     mm_token_type_ids=(ids == base.model.config.image_token_id).int())
    with torch.no_grad():
        hidden = plain(input_ids=ids, attention_mask=mask, output_hidden_states=True, **extra).hidden_states[-1]
    n_inv = len(tte.invocation_ids)
    pooled = hidden[:, -1] if tte.config.pooling == "last" else hidden[:, -n_inv:].mean(1)
    return F.normalize(pooled.float(), dim=-1)


CASES = [pytest.param(tiny_llama, False, "last", ("<|embed|>",), id="llama"),
         pytest.param(tiny_llama, False, "mean", ("<|embed|>", "<|embed2|>"), id="llama-mean2"),
         pytest.param(tiny_qwen2vl, True, "last", ("<|embed|>",), id="qwen2vl-image")]


@pytest.mark.parametrize("builder,images,pooling,invocation", CASES)
def test_plain_peft_serves_the_merged_export_as_activated_lora(tmp_path, builder, images, pooling, invocation):
    tte = UnifiedTTE(builder(), mode="activated", pooling=pooling, invocation=invocation)
    randomize_adapters(tte, std=0.15, seed=1)
    folder = export_model(tte, tmp_path / "ck", merge_think=True)
    config = json.loads((folder / "embed" / "adapter_config.json").read_text())
    assert config["alora_invocation_tokens"] == list(tte.invocation_ids)
    assert config["task_type"] == "CAUSAL_LM"
    served = load_checkpoint(folder, backbone=builder())
    inputs = rows(images)
    for traces in (TRACES, None):   # queries with traces, then candidates (no trace)
        ours = served.embed(inputs, traces)
        plain = plain_peft_embed(folder, builder, served, inputs, traces)
        assert (plain - ours).abs().max() <= TOL
        # and the unmerged model it was exported from: (W + BA)x against Wx + B(Ax), rounding only
        assert (plain - tte.embed(inputs, traces)).abs().max() <= TOL
    # The offsets matter: the same weights as a plain LoRA (every position) give another embedding.
    lora = tmp_path / "plain_lora"
    shutil.copytree(folder / "embed", lora)
    config.pop("alora_invocation_tokens")
    (lora / "adapter_config.json").write_text(json.dumps(config))
    everywhere = plain_peft_embed(folder, builder, served, inputs, TRACES, adapter_folder=lora)
    assert (everywhere - served.embed(inputs, TRACES)).abs().max() > 1e-3


@pytest.mark.parametrize("mode,merge", [("activated", False), ("top_k", True)])
def test_only_the_merged_activated_export_declares_an_activated_lora(tmp_path, mode, merge):
    """Unmerged, embed/ is only right on top of think at every position (a reader needs both);
    top_k's embed adapter reaches every position of its top layers, a plain LoRA."""
    tte = UnifiedTTE(tiny_llama(), mode=mode, embed_layers=2)
    folder = export_model(tte, tmp_path / "ck", merge_think=merge)
    config = json.loads((folder / "embed" / "adapter_config.json").read_text())
    assert config.get("alora_invocation_tokens") is None
