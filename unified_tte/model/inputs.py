"""Inputs and the collator: text + images -> token ids, pixel values and image grids.

We build model inputs ourselves (tokenizer + image processor) instead of `AutoProcessor`,
because on CPU-only machines without torchvision transformers cannot construct
`Qwen2VLProcessor`. Each image placeholder `<|image_pad|>` is expanded to
t*h*w / merge^2 tokens from the processor's `image_grid_thw`, which is what the processor does.

    from unified_tte import TTEInput
    TTEInput("Which digit is shown?", images=["digit.png"])
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError


@dataclass
class TTEInput:
    """One query or candidate: text and zero or more images (PIL images or file paths).

    Images are placed before the text in the user turn, as MMEB formats its queries.
    """
    text: str = ""
    images: list = field(default_factory=list)


@dataclass
class Trace:
    """A reasoning trace: its text and the token ids it was generated as.

    `token_ids` never include the end-of-turn token; the forward path always closes the trace
    with it, whether the model stopped there (`finished`) or hit `max_new_tokens`.
    """
    text: str
    token_ids: list[int]
    finished: bool = True


@dataclass
class EncodedPrompt:
    """A tokenised user turn (chat template and generation prompt included)."""
    ids: list[int]
    pixel_values: torch.Tensor | None = None    # [patches, C*t*p*p] as the image processor returns
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3]


def _open_image(image, index: int):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InputError(
            f"input {index}: cannot open image '{path}' ({type(exc).__name__}: {exc}). "
            "Check the path (relative paths are resolved from the current directory) "
            "and that the file is a readable image."
        ) from exc


class PromptEncoder:
    """Turns `TTEInput`s into `EncodedPrompt`s for one backbone.

    Truncation rule (stated in the README): when a prompt plus the room reserved after it
    (trace, end-of-turn, invocation) exceeds `max_length`, the *end of the user text* is cut,
    never the images, the chat markup, the trace budget or the invocation, and a warning
    names the item and how many tokens were dropped.
    """

    def __init__(self, tokenizer, image_processor=None, image_token: str = "<|image_pad|>",
                 max_length: int = 4096):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if image_processor else None
        self.merge_size = getattr(image_processor, "merge_size", 2) if image_processor else 1
        self.max_length = max_length

    def _render(self, text: str, n_images: int) -> list[int]:
        if n_images:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        else:
            content = text
        if self.tokenizer.chat_template:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        else:  # a bare LM: no markup, the text is the prompt
            rendered = text
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def encode(self, inputs: Sequence[TTEInput], reserve: int | Sequence[int] = 0) -> list[EncodedPrompt]:
        """Encode a batch; `reserve` is the room kept after each prompt (one int, or one per item)."""
        reserves = [reserve] * len(inputs) if isinstance(reserve, int) else list(reserve)
        out = []
        for index, (item, reserve) in enumerate(zip(inputs, reserves)):
            if not isinstance(item, TTEInput):
                raise InputError(f"input {index}: expected a TTEInput, got {type(item).__name__}; "
                                 "wrap text as TTEInput(text=..., images=[...]).")
            images = [_open_image(im, index) for im in item.images]
            if images and self.image_processor is None:
                raise InputError(f"input {index} has {len(images)} image(s) but this backbone is "
                                 "text-only; use a vision-language backbone (Qwen2-VL) or drop the images.")
            pixel_values = grid = None
            n_image_tokens = []
            if images:
                processed = self.image_processor(images=images, return_tensors="pt")
                pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
                n_image_tokens = [int(g.prod()) // self.merge_size ** 2 for g in grid]
            ids = self._render(item.text, len(images))
            total = len(ids) + sum(n - 1 for n in n_image_tokens) + reserve
            if total > self.max_length:
                ids = self._truncate(item, index, len(images), total - self.max_length, n_image_tokens, reserve)
            out.append(EncodedPrompt(self._expand_images(ids, n_image_tokens), pixel_values, grid))
        return out

    def _truncate(self, item, index, n_images, excess, n_image_tokens, reserve):
        text_ids = self.tokenizer(item.text, add_special_tokens=False)["input_ids"]
        keep = len(text_ids) - excess
        if keep < 0:
            raise InputError(
                f"input {index}: images, chat markup and the {reserve} tokens reserved for trace and "
                f"invocation need {self.max_length - keep} tokens, more than max_length={self.max_length}. "
                "Use fewer or smaller images, a smaller max_new_tokens, or a larger max_length.")
        warnings.warn(f"input {index}: prompt exceeds max_length={self.max_length} by {excess} tokens; "
                      f"the end of its text was cut ({len(text_ids)} -> {keep} text tokens).", stacklevel=3)
        text = self.tokenizer.decode(text_ids[:keep])
        ids = self._render(text, n_images)
        # Re-tokenising a cut string can merge differently; trim again until it fits.
        while len(ids) + sum(n - 1 for n in n_image_tokens) + reserve > self.max_length and keep > 0:
            keep -= 1
            ids = self._render(self.tokenizer.decode(text_ids[:keep]), n_images)
        return ids

    def _expand_images(self, ids: list[int], n_image_tokens: list[int]) -> list[int]:
        if not n_image_tokens:
            return ids
        out, k = [], 0
        for tok in ids:
            if tok == self.image_token_id:
                out.extend([tok] * n_image_tokens[k])
                k += 1
            else:
                out.append(tok)
        if k != len(n_image_tokens):
            raise InputError(f"the chat template placed {k} image placeholders for {len(n_image_tokens)} "
                             "images; the tokenizer's chat template must emit one per image.")
        return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to one [B, T] tensor with its 0/1 attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            ids[row, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[row, width - len(s):] = 1
    return ids, mask


def stack_images(prompts: Sequence[EncodedPrompt]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Concatenate the pixel values and grids of a batch in item order (the model's expectation)."""
    pv = [p.pixel_values for p in prompts if p.pixel_values is not None]
    grids = [p.image_grid_thw for p in prompts if p.image_grid_thw is not None]
    if not pv:
        return None, None
    return torch.cat(pv, 0), torch.cat(grids, 0)
