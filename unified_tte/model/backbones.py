"""Backbones, loaded from local files only (no hub), and uniform access to their text stack.

    from unified_tte.model import backbones
    bb = backbones.load("/models/Qwen2-VL-2B-Instruct")   # a local Hugging Face checkpoint
    stack = backbones.DecoderStack(bb.model)               # embed, positions, layers, norm, head

The built-in backbones (tiny models, SmolLM2, random weights in published shapes) are in
`zoo.py`; `zoo.load(spec)` takes a built-in name or a folder. Attention: eager, sdpa or
flash_attention_2 (`attention_implementation`, `set_attention`); every one gives the same fast
path (tests/test_attention.py, tests/gpu/test_gpu_attention.py). This module is the one place that touches transformers' model and
cache internals (decoder layers, rotary embedding, causal mask, cache layers).

Supported model types are listed in `SUPPORTED_MODEL_TYPES`; anything else is refused up front
because the forward path drives the decoder layers directly and has only been proven on these.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from einops import repeat

from ..errors import UnsupportedBackbone

VISION_LANGUAGE_TYPES = ("qwen2_vl", "qwen2_5_vl")
TEXT_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_MODEL_TYPES = VISION_LANGUAGE_TYPES + TEXT_TYPES


@dataclass
class Backbone:
    """A Hugging Face causal (V)LM with what it needs to read inputs."""
    model: torch.nn.Module
    tokenizer: object
    image_processor: object | None
    name: str

    @property
    def model_type(self) -> str:
        return self.model.config.model_type


def check_supported(model_type: str, where: str = "") -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedBackbone(
            f"backbone type '{model_type}'{' in ' + where if where else ''} is not supported; "
            f"supported types: {', '.join(SUPPORTED_MODEL_TYPES)}.")


ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
HALF_DTYPES = (torch.bfloat16, torch.float16)


def flash_attention_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def attention_implementation(requested: str | None = None, device: torch.device | str | None = None,
                             dtype: torch.dtype | None = None) -> str:
    """The attention implementation for a model that runs on `device` in `dtype`.

    `requested` None or "auto": flash-attention 2 when flash-attn is installed and the model runs
    on CUDA in bf16/fp16 (or in the checkpoint's own dtype, `dtype` None), SDPA otherwise. A named
    one is checked (`check_attention`) and returned.
    Every implementation gives the same fast-path results (tests/test_attention.py, tests/gpu/).
    """
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if requested in (None, "auto"):
        if device.type == "cuda" and (dtype is None or dtype in HALF_DTYPES) and flash_attention_installed():
            return "flash_attention_2"
        return "sdpa"
    check_attention(requested, device, dtype)
    return requested


def check_attention(implementation: str, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Refuse an attention implementation that cannot run here, with what to do instead."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise UnsupportedBackbone(f"attention implementation {implementation!r} is not supported; use one of "
                                  f"{', '.join(ATTENTION_IMPLEMENTATIONS)} (or auto).")
    if implementation != "flash_attention_2":
        return
    if not flash_attention_installed():
        raise UnsupportedBackbone("flash_attention_2 needs the flash-attn package, which is not installed: "
                                  "pip install 'unified_tte[gpu]' on a CUDA machine, or use sdpa.")
    if device is not None and torch.device(device).type != "cuda":
        raise UnsupportedBackbone(f"flash_attention_2 runs on CUDA only, not on {torch.device(device).type}; "
                                  "use sdpa there.")
    if dtype is not None and dtype not in HALF_DTYPES:
        raise UnsupportedBackbone(_flash_half_only(dtype))


def _flash_half_only(dtype: torch.dtype) -> str:
    return (f"flash_attention_2 runs in bf16 or fp16 only, not {dtype}; load the backbone with "
            "dtype=torch.bfloat16 (or cast the model), or use sdpa.")


def set_attention(model: torch.nn.Module, implementation: str) -> None:
    """Switch a loaded model (every sub-model: text stack and vision tower) to `implementation`,
    checked against where its weights are and their dtype."""
    weight = next(model.parameters())
    check_attention(implementation, weight.device, weight.dtype)
    model.set_attn_implementation(implementation)


def check_folder(path: str | Path) -> str:
    """A local checkpoint folder's model type, after checking it is one this package supports
    (cheap: config.json only; commands call it before starting any work)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise UnsupportedBackbone(f"{config_file} not found: pass a local Hugging Face checkpoint folder "
                                  "(the hub is not used at run time) or a built-in name (tiny, tiny-llama, "
                                  "smollm2, ...: unified_tte.model.zoo.BUILTIN).")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedBackbone(f"{config_file} is not valid JSON ({exc}); the checkpoint folder is "
                                  "damaged.") from None
    model_type = config.get("model_type", "<missing>") if isinstance(config, dict) else "<missing>"
    check_supported(model_type, str(config_file))
    return model_type


def load(path: str | Path, dtype: torch.dtype | None = None, device: str | None = None,
         attn_implementation: str | None = None) -> Backbone:
    """Load a local checkpoint folder (config.json + safetensors) with its tokenizer/processor.
    `attn_implementation`: see `attention_implementation` (default: auto)."""
    path = Path(path)
    model_type = check_folder(path)
    from transformers import AutoTokenizer

    attn = attention_implementation(attn_implementation, device, dtype)
    kwargs = dict(attn_implementation=attn, local_files_only=True)
    if dtype is not None:
        kwargs["dtype"] = dtype
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    image_processor = None
    if model_type in VISION_LANGUAGE_TYPES:
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        image_processor = load_image_processor(path)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device:
        model.to(device)
    return Backbone(model.eval(), tokenizer, image_processor, path.name)


def load_image_processor(path: Path):
    try:  # needs torchvision on some installs (the GPU machine has it)
        from transformers import AutoImageProcessor
        return AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure here means: use the PIL processor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        return Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)


def max_pixels_of(image_processor) -> int:
    return int(image_processor.size["longest_edge"])


def weight_hash(model: torch.nn.Module) -> str:
    """sha256 over names, shapes and bytes of every base parameter (LoRA weights excluded)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "lora_" in name:
            continue
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DecoderStack:
    """The pieces of a causal (V)LM's text stack that the forward path drives layer by layer.

    Works for Llama/Qwen2/Mistral (`model.model`) and Qwen2-VL/Qwen2.5-VL
    (`model.model.language_model`, with M-RoPE positions from `get_rope_index`).
    """

    def __init__(self, hf_model: torch.nn.Module):
        self.hf_model = hf_model
        self.model_type = hf_model.config.model_type
        check_supported(self.model_type)
        self.is_vl = self.model_type in VISION_LANGUAGE_TYPES
        self.outer = hf_model.model                      # takes input_ids (+ pixels) -> last_hidden_state
        self.lm = hf_model.model.language_model if self.is_vl else hf_model.model
        self.config = self.lm.config
        self.layers = self.lm.layers
        self.norm = self.lm.norm
        self.rotary = self.lm.rotary_emb
        self.lm_head = hf_model.lm_head
        self.num_layers = len(self.layers)
        # transformers is renaming past_key_values -> cache; support both spellings.
        params = inspect.signature(self.layers[0].forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        mask_params = inspect.signature(_create_causal_mask()).parameters
        self._mask_cache_kw = "cache" if "cache" in mask_params else "past_key_values"
        self._mask_needs_cache_position = "cache_position" in mask_params
        self.vision_positions = True   # M-RoPE positions for vision tokens (see mm_token_types)
        # Every config object an attention layer or the mask reads its implementation from.
        configs = {id(self.config): self.config}
        for layer in self.layers:
            attention_config = getattr(getattr(layer, "self_attn", None), "config", None)
            if attention_config is not None:
                configs[id(attention_config)] = attention_config
        self._attention_configs = list(configs.values())

    @property
    def dtype(self):
        return self.lm.embed_tokens.weight.dtype

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation

    @property
    def device(self):
        return self.lm.embed_tokens.weight.device

    def new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.config)

    def embed_inputs(self, input_ids, pixel_values=None, image_grid_thw=None,
                     pixel_values_videos=None, video_grid_thw=None) -> torch.Tensor:
        """Token embeddings with image and video features scattered into their placeholder
        positions (`<|image_pad|>`, `<|video_pad|>`)."""
        embeds = self.lm.embed_tokens(input_ids)
        for values, grid, what in ((pixel_values, image_grid_thw, "image"),
                                   (pixel_values_videos, video_grid_thw, "video")):
            if values is None:
                continue
            token_id = getattr(self.hf_model.config, f"{what}_token_id")
            features = getattr(self.outer, f"get_{what}_features")(values, grid, return_dict=True)
            features = torch.cat(features.pooler_output, 0).to(embeds.dtype)
            mask = (input_ids == token_id).unsqueeze(-1)
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(f"{int(mask.sum())} {what} tokens in the batch but {features.shape[0]} "
                                 f"{what} features; the collator must expand one placeholder per feature.")
            embeds = embeds.masked_scatter(mask, features)
        return embeds

    def mm_token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Qwen2-VL's `mm_token_type_ids`: 0 text, 1 image, 2 video token. With
        `vision_positions=False` every token counts as text, so vision tokens get 1D positions:
        what transformers < 5 computed for prompts without `<|vision_start|>`, i.e. VLM2Vec's
        raw Qwen2-VL prompts (prompt_format "vlm2vec")."""
        config = self.hf_model.config
        types = (input_ids == config.image_token_id).int()
        video_id = getattr(config, "video_token_id", None)
        if video_id is not None:
            types = types + 2 * (input_ids == video_id).int()
        return types if self.vision_positions else torch.zeros_like(types)

    def prompt_positions(self, input_ids, attention_mask, image_grid_thw=None, video_grid_thw=None):
        """Positions of a left-padded batch, and each row's offset for text tokens after it.

        Returns (positions [B, T] or [3, B, T] for M-RoPE, delta [B]) where a text token that is
        the n-th real token of its row (0-based) sits at position n + delta.
        """
        if self.is_vl:
            pos, delta = self.outer.get_rope_index(input_ids, mm_token_type_ids=self.mm_token_types(input_ids),
                                                   image_grid_thw=image_grid_thw,
                                                   video_grid_thw=video_grid_thw,
                                                   attention_mask=attention_mask)
            return pos, delta.view(-1).to(input_ids.device)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos, torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)

    def text_positions(self, real_index: torch.Tensor, delta: torch.Tensor):
        """Positions for text tokens given their 0-based real-token index per row ([B, T])."""
        pos = real_index + delta.view(-1, 1)
        # M-RoPE: a text token has the same temporal, height and width position.
        return repeat(pos, "b t -> axes b t", axes=3) if self.is_vl else pos

    def run_layers(self, hidden, attention_mask, positions, cache=None, start=0, stop=None,
                   capture_at: int | None = None):
        """Run decoder layers [start, stop) on `hidden` ([B, t, D]).

        `attention_mask` is the 2D 0/1 mask over cached + new tokens. With a cache, new keys are
        appended to it. Returns (hidden after layer stop-1, residual entering `capture_at`).

        The 2D mask may have holes (a row that stopped decoding feeds masked pads) and the new
        tokens are left-padded per chunk; every implementation gets what it needs from it through
        transformers' own mask functions: eager / sdpa a 4D mask, flash-attention 2 the 2D mask,
        from which it unpads keys (holes included) and the new queries (the last t columns,
        which is right because chunks are left-padded) and runs the varlen kernel with the causal
        diagonal aligned bottom-right (flash-attn >= 2.1). Positions are ours (M-RoPE included),
        never recomputed from the mask. tests/test_attention.py holds eager == sdpa == flash-
        attention 2's contract on CPU, tests/gpu/ the real kernels.
        """
        from transformers.masking_utils import create_causal_mask

        stop = self.num_layers if stop is None else stop
        if self.attn_implementation == "flash_attention_2" and hidden.dtype not in HALF_DTYPES:
            raise UnsupportedBackbone(_flash_half_only(hidden.dtype))  # e.g. a model cast to fp32 later
        mask_kwargs = {"config": self.config, "inputs_embeds": hidden, "attention_mask": attention_mask,
                       self._mask_cache_kw: cache}
        if self._mask_needs_cache_position:  # older transformers
            past = cache.get_seq_length() if cache is not None else 0
            mask_kwargs["cache_position"] = torch.arange(past, past + hidden.shape[1], device=hidden.device)
        mask = create_causal_mask(**mask_kwargs)
        position_embeddings = self.rotary(hidden, positions)
        captured = None
        for index in range(start, stop):
            if index == capture_at:
                captured = hidden
            hidden = self.layers[index](
                hidden, attention_mask=mask, position_embeddings=position_embeddings,
                position_ids=None, use_cache=cache is not None, **{self._cache_kw: cache})
            if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
                hidden = hidden[0]
        if capture_at == stop:
            captured = hidden
        return hidden, captured


    @contextlib.contextmanager
    def grouped_attention(self):
        """With SDPA attention, the layers run `grouped_sdpa_attention` for the duration (the
        decode and invocation steps: few queries against a long cache); otherwise nothing
        changes. Set outside a compiled or captured step, so what is traced is the grouped call."""
        if self.attn_implementation != "sdpa":
            yield
            return
        register_grouped_sdpa()
        for config in self._attention_configs:
            config._attn_implementation = GROUPED_SDPA
        try:
            yield
        finally:
            for config in self._attention_configs:
                config._attn_implementation = "sdpa"

    # ------------------------------------------------------------------ static cache (decode)
    def static_cache(self, cache, extra: int, round_to: int = 1) -> "StaticKV | None":
        """Copy a DynamicCache whose every layer holds the same T0 positions into preallocated
        buffers with room for `extra` more ([B, kv_heads, T0 + extra, head_dim] per layer, the
        length rounded up to a multiple of `round_to`); None when the cache is not like that (a
        layer never run, e.g. top_k's prefix)."""
        length = self.cache_length(cache)
        if length is None:
            return None
        capacity = -(-(length + extra) // round_to) * round_to
        kb, vb = [], []
        for layer in cache.layers:
            b, h, _, d = layer.keys.shape
            kb.append(layer.keys.new_zeros(b, h, capacity, d))
            vb.append(layer.values.new_zeros(b, h, capacity, layer.values.shape[-1]))
        static = StaticKV(kb, vb, length)
        static.fill_from(cache)
        return static

    def cache_length(self, cache) -> int | None:
        """The positions every layer of a DynamicCache holds; None when its layers differ (a layer
        never run, e.g. top_k's prefix) or it is not a cache of per-layer key/value tensors."""
        layers = list(getattr(cache, "layers", []))
        keys = [getattr(layer, "keys", None) for layer in layers]
        if len(layers) != self.num_layers or any(k is None or k.dim() != 4 for k in keys):
            return None
        length = keys[0].shape[-2]
        return length if all(k.shape[-2] == length for k in keys) else None

    @staticmethod
    def release(cache) -> None:
        """Empty a DynamicCache whose contents a StaticKV now holds (one copy of the KV cache in
        memory while decoding, not two); `write_back` fills it again."""
        for layer in cache.layers:
            b, h, _, d = layer.keys.shape
            layer.keys = layer.keys.new_empty(b, h, 0, d)
            layer.values = layer.values.new_empty(b, h, 0, layer.values.shape[-1])

    @staticmethod
    def write_back(static: "StaticKV", cache, length: int) -> None:
        """Hand the first `length` positions of the static buffers to the DynamicCache (views: the
        buffers belong to one decode and are not reused)."""
        for layer, k, v in zip(cache.layers, static.keys, static.values):
            layer.keys, layer.values = k[:, :, :length], v[:, :, :length]

    def static_step(self, ids, positions, mask, static: "StaticKV", capture_at: int | None = None,
                    residual_out=None, residual_index=None):
        """t tokens per row ([B, t] ids: one decode step, or the invocation step) through every
        layer against a static cache: their K/V go to the slots `static.write_pos` ([t]), attention
        reads the whole buffer under `mask` (bool, [B, T_max] for one token or [B, t, T_max]:
        False for pads, slots not written yet and, among the new tokens, later ones). Every shape
        is fixed, so a CUDA graph can replay it and torch.compile compiles it once per shape. The
        residual entering `capture_at` is written into `residual_out` ([B, steps, D]) at
        `residual_index` (decode only). Returns the hidden states after the last layer [B, t, D].

        eager / sdpa only: the 4D mask is built here (bool for sdpa, additive for eager)."""
        hidden = self.lm.embed_tokens(ids)
        position_embeddings = self.rotary(hidden, positions)
        mask4d = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
        if self.attn_implementation == "eager":
            zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
            mask4d = torch.where(mask4d, zero, torch.finfo(hidden.dtype).min)
        for index, layer in enumerate(self.layers):
            if index == capture_at:
                residual_out.index_copy_(1, residual_index, hidden)
            hidden = layer(hidden, attention_mask=mask4d, position_embeddings=position_embeddings,
                           position_ids=None, use_cache=True, **{self._cache_kw: static})
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return hidden


    def static_invocation_step(self, ids, positions, mask, static: "StaticKV"):
        """`static_step` for the embed step's t tokens: its own function, so that torch.compile
        keeps its compiled graphs apart from the decode step's (and neither sees the other's
        shapes as a reason to recompile for dynamic ones)."""
        return self.static_step(ids, positions, mask, static)


class StaticKV:
    """Preallocated keys and values per layer. `update` (what a transformers attention layer calls
    on its cache) writes the new tokens at `write_pos`, a device tensor of slots ([t]), so a
    captured CUDA graph writes to the slots the tensor holds at replay; it returns the whole
    buffers."""

    def __init__(self, keys: list, values: list, length: int, width: int = 1):
        self.keys, self.values = keys, values
        self.write_pos = torch.arange(length, length + width, dtype=torch.long, device=keys[0].device)

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[-2]

    def fill_from(self, cache) -> None:
        """Copy a DynamicCache's keys and values into the first slots (the rest keep whatever
        they held: the attention mask hides them)."""
        for layer, k, v in zip(cache.layers, self.keys, self.values):
            length = layer.keys.shape[-2]
            k[:, :, :length].copy_(layer.keys)
            v[:, :, :length].copy_(layer.values)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.write_pos, key_states)
        self.values[layer_idx].index_copy_(2, self.write_pos, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


GROUPED_SDPA = "tte_grouped_sdpa"   # a private name in transformers' attention and mask registries


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, **kwargs):
    """transformers' SDPA attention without `repeat_kv` for grouped-query attention under a mask.

    transformers copies every key/value head `groups` times before SDPA whenever a mask is given
    (except for one query outside torch.compile): for a few new tokens against a long cache that
    copy of the whole cache, every layer, costs more than the attention itself (SmolLM2, 640
    positions, CPU: ~0.45 ms of ~0.1 ms per layer). Here the queries of each key/value head are
    stacked along the query axis instead ([B, H, t, d] -> [B, KVH, groups * t, d], the mask
    repeated to match), which is the same attention for any SDPA kernel. Anything else (no mask,
    dropout, a position bias, one head per group) is transformers' own sdpa_attention_forward.
    tests/test_embed_step.py holds the two equal."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or attention_mask is None or dropout or kwargs.get("position_bias") is not None
            or attention_mask.dim() != 4 or attention_mask.shape[1] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, width, dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    grouped = query.reshape(batch, kv_heads, groups * width, dim)       # rows: (group, query)
    mask = attention_mask[..., :kv_length].expand(batch, 1, width, kv_length)
    mask = mask[:, :, None].expand(batch, 1, groups, width, kv_length).reshape(batch, 1, groups * width, kv_length)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, width, value.shape[-1]).transpose(1, 2).contiguous(), None


def register_grouped_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def _create_causal_mask():
    from transformers.masking_utils import create_causal_mask
    return create_causal_mask


def crop_cache(cache, length: int) -> None:
    """Cut every layer of a DynamicCache back to its first `length` positions (layers that were
    never run stay empty). Written against the cache layers' `keys`/`values` because `crop`'s
    argument changed meaning between transformers releases."""
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.dim() >= 2 and keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def select_cache_rows(cache, rows: torch.Tensor) -> None:
    """Keep only the batch rows `rows` (a 1-D index) in every layer of a DynamicCache, in place
    (layers that were never run stay empty); the same layer attributes as `crop_cache`."""
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.dim() >= 2 and keys.numel():
            layer.keys = layer.keys.index_select(0, rows.to(keys.device))
            layer.values = layer.values.index_select(0, rows.to(keys.device))


def add_invocation_tokens(backbone: Backbone, tokens: Sequence[str]) -> list[int]:
    """Add the invocation tokens to the backbone's tokenizer; new embedding rows start at the mean
    row. Idempotent: tokens already present keep their rows. Returns their ids.

    The mean row is deterministic (so the base weight hash is reproducible: export pins it) and
    sits inside the distribution the model has seen, unlike a random row."""
    tok = backbone.tokenizer
    before = len(tok)
    tok.add_tokens(list(tokens), special_tokens=True)
    ids = tok.convert_tokens_to_ids(list(tokens))
    new_ids = [i for i in ids if i >= before]
    model = backbone.model
    emb = model.get_input_embeddings()
    if max(ids) >= emb.weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        emb = model.get_input_embeddings()
    if new_ids:
        with torch.no_grad():
            emb.weight[new_ids] = emb.weight[:before].mean(0, keepdim=True)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
                out.weight[new_ids] = out.weight[:before].mean(0, keepdim=True)
    return ids
