"""Test helpers: random adapter weights, synthetic images, the trace convention of HF
`generate` output, and what third-party progress output looks like in a log. The tiny models themselves are the product's built-in backbones
(`unified_tte.model.zoo`).

    from unified_tte.testing import randomize_adapters, solid_image
"""
from __future__ import annotations

import re

import torch

# Hugging Face's and DeepSpeed's progress bars and info lines, as they appear in a log.
THIRD_PARTY_OUTPUT = re.compile(r"Loading weights|Writing model shards|de-quantizing GGUF|it/s\]|s/it\]|built successfully|\[INFO\]")


def third_party_lines(text: str) -> list[str]:
    """The lines (split at newlines and carriage returns) of third-party progress output."""
    return [line for line in re.split(r"[\r\n]", text) if THIRD_PARTY_OUTPUT.search(line)]


def randomize_adapters(tte, std: float = 0.1, seed: int = 0, adapters=("think", "embed")) -> None:
    """Give LoRA weights random values so tests see non-zero deltas (a fresh LoRA has B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tte.peft_model.named_parameters():
            if "lora_" in name and any(f".{a}." in name for a in adapters):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def solid_image(width: int, height: int, color=(200, 30, 30)):
    """A plain RGB image with a lighter square, so patches differ."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), color)
    ImageDraw.Draw(im).rectangle([width // 4, height // 4, width // 2, height // 2], fill=(240, 240, 240))
    return im


def until_stop(token_ids, stop_ids) -> list[int]:
    """A generated row cut before its first stop token (how `Trace.token_ids` are defined)."""
    out = []
    for tok in token_ids:
        if tok in stop_ids:
            break
        out.append(int(tok))
    return out

