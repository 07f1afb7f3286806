"""Inputs and the collator: text + images + videos -> token ids, pixel values and grids.

We build model inputs ourselves (tokenizer + image processor) instead of `AutoProcessor`,
because on CPU-only machines without torchvision transformers cannot construct
`Qwen2VLProcessor`. Each image placeholder `<|image_pad|>` is expanded to
t*h*w / merge^2 tokens from the processor's `image_grid_thw`, which is what the processor does;
each `<|video_pad|>` likewise from `video_grid_thw` (videos are patched in video.py).

    from unified_tte import TTEInput
    TTEInput("Which digit is shown?", images=["digit.png"])
    TTEInput("What happens next?", videos=["frames/clip_7/"], max_pixels=28 * 28 * 256)

Image size: every image (and video frame) is resized to between `min_pixels` and `max_pixels`
pixels (multiples of 28 px); which setting wins (the input's, the model's, the processor's) is
stated once, in UnifiedTTE.set_image_size, and applied here (PromptEncoder.size_for).

Prompt formats: "chat" (default) renders the user turn with the tokenizer's chat template,
media first, then the text. "vlm2vec" renders VLM2Vec's raw prompt for Qwen2-VL: one
`<|image_pad|>` / `<|video_pad|>` per medium, a space, then the text; no chat markup and no
`<|vision_start|>` (see UnifiedTTE for its pooling and positions).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import InputError
from .media import DEFAULT_FPS, DEFAULT_MAX_FRAMES, load_frames, open_image, video_patches

PROMPT_FORMATS = ("chat", "vlm2vec")


@dataclass
class TTEInput:
    """One query or candidate: text, zero or more images (PIL images or file paths) and videos
    (see media.py: frame lists, frame folders, video files, or `Video`s).

    Images, then videos, are placed before the text in the user turn, as MMEB formats its
    queries. `max_pixels` caps every image and frame of this input (e.g. a document task's
    override); None uses the model's (UnifiedTTE.set_image_size).
    """
    text: str = ""
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    max_pixels: int | None = None
    source: str | None = field(default=None, compare=False, repr=False)
    """Where the input came from, e.g. "row ImageNet_1K:17 query" (data.schema sets it); the
    collator's warnings and errors name it beside the batch index."""

    def __post_init__(self):
        # A bare path or image is one image (never iterated as characters); None is no media.
        self.images = _as_media_list(self.images, "images")
        self.videos = _as_media_list(self.videos, "videos")
        if self.text is None:
            self.text = ""
        if not isinstance(self.text, str):
            raise InputError(f"TTEInput.text must be a string, got {type(self.text).__name__} "
                             f"({str(self.text)[:40]!r}); convert it first if that is what you meant.")
        if self.max_pixels is not None and (not isinstance(self.max_pixels, int) or self.max_pixels < 28 * 28):
            raise InputError(f"TTEInput.max_pixels must be an integer >= 784 (one 28 x 28 image token), "
                             f"got {self.max_pixels!r}.")


def _as_media_list(value, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)) or hasattr(value, "getpixel") or type(value).__name__ == "Video":
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise InputError(f"TTEInput.{name} must be a list (or one path / image), got {type(value).__name__}.")


@dataclass
class Trace:
    """A reasoning trace: its text and the token ids it was generated as.

    `token_ids` never include the end-of-turn token; the forward path always closes the trace
    with it, whether the model stopped there (`finished`) or hit `max_new_tokens`. A query the
    think gate sent straight to its direct embedding has `thought=False` and an empty trace;
    `answer_logprob` is the mean log-probability of the final-answer tokens (after `</think>`)
    where the decode recorded it, and `used` says which embedding the query got ("tte", or
    "direct" when the gate skipped decoding or the answer fallback replaced it).
    """
    text: str
    token_ids: list[int]
    finished: bool = True
    thought: bool = True
    answer_logprob: float | None = None
    used: str = "tte"


@dataclass
class EncodedPrompt:
    """A tokenised user turn (chat template and generation prompt included)."""
    ids: list[int]
    pixel_values: torch.Tensor | None = None    # [patches, C*t*p*p] as the image processor returns
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3]
    pixel_values_videos: torch.Tensor | None = None   # [patches, C*t*p*p], all videos of the prompt
    video_grid_thw: torch.Tensor | None = None        # [n_videos, 3]


def chat_messages(content, system_prompt: str | None = None) -> list[dict]:
    """The chat messages of one prompt: a system turn when `system_prompt` is not None (None
    leaves the chat template its default), then the user turn. Plain `apply_chat_template` on
    these gives the prompt UnifiedTTE encodes, e.g. to decode with Hugging Face `generate`."""
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return system + [{"role": "user", "content": content}]


class PromptEncoder:
    """Turns `TTEInput`s into `EncodedPrompt`s for one backbone.

    Truncation rule (stated in docs/guide.md): when a prompt plus the room reserved after it
    (trace, end-of-turn, invocation) exceeds `max_length`, the *end of the user text* is cut,
    never the images, the chat markup, the trace budget or the invocation, and a warning
    names the item and how many tokens were dropped.

    Args:
        max_pixels / min_pixels: the size range of every image and video frame (None: the
            processor's own); UnifiedTTE.set_image_size sets them on a model's encoder.
        max_frames / fps: video sampling defaults (see media.py).
        prompt_format: "chat" or "vlm2vec" (see the module docstring).
        system_prompt: the chat format's system turn (None: the chat template's default).
    """

    def __init__(self, tokenizer, image_processor=None, image_token: str = "<|image_pad|>",
                 max_length: int = 4096, max_pixels: int | None = None, min_pixels: int | None = None,
                 max_frames: int = DEFAULT_MAX_FRAMES, fps: float = DEFAULT_FPS,
                 prompt_format: str = "chat", video_token: str = "<|video_pad|>",
                 system_prompt: str | None = None):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token, self.video_token = image_token, video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if image_processor else None
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token) if image_processor else None
        self.merge_size = getattr(image_processor, "merge_size", 2) if image_processor else 1
        self.max_length = max_length
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        self.max_frames, self.fps = max_frames, fps
        self.prompt_format = prompt_format
        self.system_prompt = system_prompt

    def size_for(self, item: TTEInput) -> dict | None:
        """The image processor's `size` for this input (None: the processor's defaults), by the
        rule of UnifiedTTE.set_image_size."""
        max_pixels = item.max_pixels or self.max_pixels
        if max_pixels is None and self.min_pixels is None:
            return None
        default = getattr(self.image_processor, "size", None) or {}
        low = self.min_pixels or default.get("shortest_edge") or 56 * 56
        high = max_pixels or default.get("longest_edge") or 28 * 28 * 1280
        return {"shortest_edge": min(low, high), "longest_edge": high}

    def _render(self, text: str, n_images: int, n_videos: int = 0) -> list[int]:
        if self.prompt_format == "vlm2vec":  # the reference's raw prompt: media tokens, a space, the text
            rendered = "".join(f"{self.image_token} " for _ in range(n_images))
            rendered += "".join(f"{self.video_token} " for _ in range(n_videos)) + text
        elif self.tokenizer.chat_template:
            content = text
            if n_images or n_videos:
                content = ([{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
                           + [{"type": "text", "text": text}])
            rendered = self.tokenizer.apply_chat_template(
                chat_messages(content, self.system_prompt), tokenize=False, add_generation_prompt=True)
        else:  # a bare LM: no markup, the text is the prompt
            rendered = text
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def _media(self, item: TTEInput, index: int):
        """(pixel values, grids, tokens per image) and the same for videos, of one input."""
        images = [open_image(im, index) for im in item.images]
        if (images or item.videos) and self.image_processor is None:
            raise InputError(f"input {index} has images or videos but this backbone is text-only; "
                             "use a vision-language backbone (Qwen2-VL) or drop them.")
        size = self.size_for(item) if (images or item.videos) else None
        kwargs = {} if size is None else {"size": size}
        pixel_values = grid = video_values = video_grid = None
        n_image_tokens, n_video_tokens = [], []
        if images:
            processed = self.image_processor(images=images, return_tensors="pt", **kwargs)
            pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
            n_image_tokens = [int(g.prod()) // self.merge_size ** 2 for g in grid]
        if item.videos:
            if size is None:
                default = self.image_processor.size
                size = {"shortest_edge": default["shortest_edge"], "longest_edge": default["longest_edge"]}
            parts, grids = [], []
            for video in item.videos:
                frames = load_frames(video, index, self.fps, self.max_frames)
                values, thw = video_patches(frames, self.image_processor, size)
                parts.append(torch.from_numpy(values))
                grids.append(thw)
            video_values, video_grid = torch.cat(parts), torch.tensor(grids, dtype=torch.long)
            n_video_tokens = [int(g.prod()) // self.merge_size ** 2 for g in video_grid]
        return (pixel_values, grid, n_image_tokens), (video_values, video_grid, n_video_tokens)

    def encode(self, inputs: Sequence[TTEInput], reserve: int | Sequence[int] = 0) -> list[EncodedPrompt]:
        """Encode a batch; `reserve` is the room kept after each prompt (one int, or one per item)."""
        reserves = [reserve] * len(inputs) if isinstance(reserve, int) else list(reserve)
        out = []
        for index, (item, reserve) in enumerate(zip(inputs, reserves)):
            if not isinstance(item, TTEInput):
                raise InputError(f"input {index}: expected a TTEInput, got {type(item).__name__}; "
                                 "wrap text as TTEInput(text=..., images=[...]).")
            where = f"input {index}" + (f" ({item.source})" if item.source else "")
            try:
                item.text.encode("utf-8")
            except UnicodeEncodeError as exc:   # the tokenizer would raise a TypeError naming no input
                raise InputError(f"{where}: its text holds {item.text[exc.start]!r} at character {exc.start}, a lone "
                                 "surrogate (not valid Unicode: half of an emoji pair, or a JSON '\\ud800' "
                                 "escape); fix or remove that character.") from None
            (pixel_values, grid, n_img), (video_values, video_grid, n_vid) = self._media(item, index)
            n_media = len(n_img), len(n_vid)
            ids = self._render(item.text, *n_media)
            total = len(ids) + sum(n - 1 for n in n_img + n_vid) + reserve
            if total > self.max_length:
                ids = self._truncate(item, where, n_media, total - self.max_length, n_img + n_vid, reserve)
            ids = self._expand(ids, self.image_token_id, n_img, "image")
            ids = self._expand(ids, self.video_token_id, n_vid, "video")
            out.append(EncodedPrompt(ids, pixel_values, grid, video_values, video_grid))
        return out

    def _truncate(self, item, where, n_media, excess, n_media_tokens, reserve):
        text_ids = self.tokenizer(item.text, add_special_tokens=False)["input_ids"]
        keep = len(text_ids) - excess
        if keep < 0:
            raise InputError(
                f"{where}: images, chat markup and the {reserve} tokens reserved for trace and "
                f"invocation need {self.max_length - keep} tokens, more than max_length={self.max_length}. "
                "Use fewer or smaller images (max_pixels), a smaller max_new_tokens, or a larger max_length.")
        warnings.warn(f"{where}: prompt exceeds max_length={self.max_length} by {excess} tokens; "
                      f"the end of its text was cut ({len(text_ids)} -> {keep} text tokens).", stacklevel=3)
        text = self.tokenizer.decode(text_ids[:keep])
        ids = self._render(text, *n_media)
        # Re-tokenising a cut string can merge differently; trim again until it fits.
        while len(ids) + sum(n - 1 for n in n_media_tokens) + reserve > self.max_length and keep > 0:
            keep -= 1
            ids = self._render(self.tokenizer.decode(text_ids[:keep]), *n_media)
        return ids

    def _expand(self, ids: list[int], token_id, n_tokens: list[int], what: str) -> list[int]:
        if not n_tokens:
            return ids
        out, k = [], 0
        for tok in ids:
            if tok == token_id and k < len(n_tokens):
                out.extend([tok] * n_tokens[k])
                k += 1
            else:
                out.append(tok)
        if k != len(n_tokens):
            raise InputError(f"the prompt has {k} {what} placeholders for {len(n_tokens)} {what}s; "
                             f"the tokenizer's chat template must emit one per {what}.")
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


def _stack(prompts: Sequence[EncodedPrompt], values: str, grids: str):
    pv = [getattr(p, values) for p in prompts if getattr(p, values) is not None]
    if not pv:
        return None, None
    return torch.cat(pv, 0), torch.cat([getattr(p, grids) for p in prompts if getattr(p, grids) is not None], 0)


def stack_images(prompts: Sequence[EncodedPrompt]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Concatenate the pixel values and grids of a batch in item order (the model's expectation)."""
    return _stack(prompts, "pixel_values", "image_grid_thw")


def stack_videos(prompts: Sequence[EncodedPrompt]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`stack_images` for the videos of a batch."""
    return _stack(prompts, "pixel_values_videos", "video_grid_thw")


def _image_key(image, memo: dict) -> str:
    """Content key of an image: its resolved path, or a hash of a PIL image's pixels."""
    if isinstance(image, (str, os.PathLike)):
        return "path:" + os.path.abspath(image)
    k = memo.get(id(image))
    if k is None:
        h = hashlib.sha1(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
        k = memo[id(image)] = "pil:" + h.hexdigest()
    return k


def _video_key(video, memo: dict) -> str:
    source = getattr(video, "source", video)
    opts = (getattr(video, "fps", None), getattr(video, "max_frames", None))
    if isinstance(source, (str, os.PathLike)):
        return f"video:{os.path.abspath(source)}:{opts}"
    return f"video:{[_image_key(f, memo) for f in source]}:{opts}"


def content_key(item, memo: dict) -> tuple:
    """Two TTEInputs with the same key embed to the same vector (text, image content or path,
    video frames and sampling, size cap); `memo` caches the pixel hashes of PIL images by id."""
    key = (item.text, tuple(_image_key(im, memo) for im in item.images))
    videos = getattr(item, "videos", None)
    if videos or getattr(item, "max_pixels", None):
        key += (tuple(_video_key(v, memo) for v in videos), item.max_pixels)
    return key
