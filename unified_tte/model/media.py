"""Images and videos: opening images, and videos for Qwen2-VL's own video path: frames from a list, a folder or a file, sampled and
patched the way Qwen2-VL's video processor does it, built on the image processor (so no
torchvision is needed).

    from unified_tte.model.media import Video
    TTEInput("What happens?", videos=[Video("clip.mp4", fps=1.0, max_frames=8)])
    TTEInput("What happens?", videos=["frames/video_0001/"])      # a folder of frame images
    TTEInput("What happens?", videos=[[frame0, frame1, frame2]])   # PIL images (or paths)

Sampling: a folder or list keeps `max_frames` frames spread evenly over it (first and last
included), as VLM2Vec samples its saved frames; a file is decoded with PyAV (`pip install
'unified_tte[video]'`) at `fps` frames per second, then capped to `max_frames` the same way.
The frame count is padded to a multiple of the temporal patch size (2) by repeating the last
frame, as the Hugging Face video processor does. Every frame is resized like an image (the same
`min_pixels`/`max_pixels`), so a video of T frames costs T/2 * h * w / merge^2 tokens.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError, require

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
DEFAULT_MAX_FRAMES = 8      # VLM2Vec-V2 embeds 8 frames per video
DEFAULT_FPS = 1.0           # frames per second read from a video file before the cap


@dataclass
class Video:
    """A video: `source` is a list of frames (PIL images or image paths), a folder of frame
    images (sorted by name, numbers in names compared as numbers), or a video file. `fps` and
    `max_frames` override the encoder's defaults for this video."""
    source: object
    fps: float | None = None
    max_frames: int | None = None


def to_rgb(im, where: str):
    """8-bit RGB from any PIL mode, without losing what the pixels say.

    `convert("RGB")` clips 16-bit and float images to 255 (a 16-bit scan turns white), so those
    are scaled to 8 bits first: 16-bit integers by 1/257 (65535 -> 255), floats from their own
    min..max range. Transparency (RGBA, LA, palette with a transparent colour) is composited on
    white, as a page or a product photo is usually shown. An image with no pixels is refused."""
    from PIL import Image

    if im.width == 0 or im.height == 0:
        raise InputError(f"{where}: the image has no pixels ({im.width}x{im.height}); drop it or replace it.")
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(im, dtype=np.float64)
        # "I" is 32-bit: PNG's 16-bit images often open as it; its range decides the scale.
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) <= 65535 else values.max()
        im = Image.fromarray(np.clip(np.rint(values * (255.0 / max(top, 1.0))), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        values = np.asarray(im, dtype=np.float64)
        finite = values[np.isfinite(values)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) / max(high - low, 1e-12)
        im = Image.fromarray(np.rint(scaled * 255).astype(np.uint8), "L")
    elif mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def open_image(image, index: int):
    """An RGB PIL image from a PIL image or a path; InputError naming the input otherwise.
    The file is decoded here (not lazily later), so a corrupt file is found at once. An EXIF
    Orientation tag is applied (`ImageOps.exif_transpose`): the model sees the image as viewers
    show it (a phone photo stored 80x40 with Orientation=6 goes in as 40x80), as most vision
    pipelines do."""
    from PIL import Image, ImageOps

    if image is None:
        raise InputError(f"input {index}: an image is None; give a PIL image or a path, or leave it out.")
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image), f"input {index}")
    if not isinstance(image, (str, os.PathLike)):
        raise InputError(f"input {index}: an image must be a PIL image or a path, got {type(image).__name__}.")
    path = Path(image)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(ImageOps.exif_transpose(im), f"input {index}: image '{path}'")
    except Image.DecompressionBombError as exc:
        raise InputError(f"input {index}: image '{path}' is too large to decode safely ({exc}); downscale "
                         "it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file.") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(
            f"input {index}: cannot open image '{path}' ({type(exc).__name__}: {exc}). "
            "Check the path (relative paths are resolved from the current directory) "
            "and that the file is a readable image."
        ) from exc


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def frame_files(folder: str | os.PathLike) -> list[Path]:
    """The frame images of a folder, in natural name order."""
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES),
                  key=lambda p: _natural_key(p.name))


def evenly(items: list, n: int) -> list:
    """`n` items spread evenly over `items` (first and last kept); all of them if fewer."""
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def decode_file(path: Path, fps: float, index: int) -> list:
    """Frames of a video file sampled at `fps` (PyAV, the [video] extra)."""
    av = require("av", "video", "reading video files")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames, next_t = [], 0.0
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else next_t
                if t + 1e-6 >= next_t:
                    frames.append(frame.to_image())
                    next_t = t + 1.0 / fps
    except (OSError, av.error.FFmpegError, IndexError) as exc:
        raise InputError(f"input {index}: cannot decode video '{path}' ({type(exc).__name__}: "
                         f"{exc}). Check that it is a readable video file.") from exc
    if not frames:
        raise InputError(f"input {index}: video '{path}' has no frames.")
    return frames


def load_frames(video, index: int, fps: float = DEFAULT_FPS,
                max_frames: int = DEFAULT_MAX_FRAMES) -> list:
    """The sampled RGB frames (PIL) of one video (see the module docstring)."""
    if isinstance(video, Video):
        fps = video.fps or fps
        max_frames = video.max_frames or max_frames
        video = video.source
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if path.is_dir():
            files = frame_files(path)
            if not files:
                raise InputError(f"input {index}: video folder '{path}' holds no frame images "
                                 f"({', '.join(FRAME_SUFFIXES)}).")
            return [open_image(f, index) for f in evenly(files, max_frames)]
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
            return [im.convert("RGB") for im in evenly(decode_file(path, fps, index), max_frames)]
        raise InputError(f"input {index}: video '{path}' is neither a folder of frames nor a "
                         f"video file ({', '.join(VIDEO_SUFFIXES)}).")
    if isinstance(video, Sequence) and not isinstance(video, (str, bytes)):
        if not video:
            raise InputError(f"input {index}: a video with no frames.")
        return [open_image(f, index) for f in evenly(list(video), max_frames)]
    raise InputError(f"input {index}: a video is a list of frames, a folder of frames or a video "
                     f"file (or a Video), got {type(video).__name__}.")


def video_patches(frames: list, image_processor, size: dict) -> tuple[np.ndarray, list[int]]:
    """Patch a video the way Qwen2-VL's video processor does, from the image processor's
    per-frame resize and normalisation.

    Each frame goes through the image processor alone, which repeats it along the temporal
    patch axis; frame 2g and 2g + 1 are then put side by side on that axis. Patch order is
    (t, h / merge, w / merge, merge, merge), each patch (C, temporal, p, p), as the model reads it.
    Returns (pixel values [t * h * w, C * tp * p * p], grid [t, h, w]).
    """
    tp = image_processor.temporal_patch_size
    sized = [frames[0].size == f.size for f in frames]
    if not all(sized):  # a video's frames share one size; decoders guarantee it, folders may not
        frames = [f.resize(frames[0].size) for f in frames]
    frames = frames + [frames[-1]] * (-len(frames) % tp)
    out = image_processor(images=frames, return_tensors="np", size=size)
    per_frame, grids = out["pixel_values"], out["image_grid_thw"]
    _, gh, gw = (int(v) for v in grids[0])
    n = gh * gw
    channels = 3
    p = image_processor.patch_size
    per_frame = per_frame.reshape(len(frames), n, channels, tp, p, p)[:, :, :, 0]   # [T, n, C, p, p]
    groups = per_frame.reshape(len(frames) // tp, tp, n, channels, p, p)
    patches = groups.transpose(0, 2, 3, 1, 4, 5).reshape(len(frames) // tp * n, channels * tp * p * p)
    return np.ascontiguousarray(patches), [len(frames) // tp, gh, gw]
