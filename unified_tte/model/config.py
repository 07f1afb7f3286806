"""TTEConfig: how a UnifiedTTE is wired (mode, K, invocation tokens, pooling, LoRA shape).

    from unified_tte.model import TTEConfig
    cfg = TTEConfig(mode="top_k", embed_layers=4)

Saved as tte_config.json by training runs and exports; `TTEConfig.from_dict` reads it back
(keys that are not fields, such as the backbone spec or hashes, are ignored).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

THINK_POLICIES = ("always", "never", "auto")


@dataclass
class TTEConfig:
    """How the unified model is wired; the forward-path contract is in `model/tte.py`."""
    mode: Literal["activated", "top_k"] = "activated"
    embed_layers: int | None = None          # K for top_k; default L // 4
    think: Literal["lora", "none"] = "lora"   # "none": the backbone itself is the reasoner
    invocation: tuple[str, ...] = ("<|embed|>",)
    pooling: Literal["last", "mean"] = "last"
    lora_r: int = 16
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    max_length: int | None = None            # default: the backbone's max_position_embeddings
    seed: int = 0                            # seeds the LoRA initialisation only
    max_pixels: int | None = None            # image / frame size cap; None: the processor's (VLM2Vec: 28*28*1280)
    min_pixels: int | None = None            # None: the processor's (VLM2Vec: 28*28*4)
    max_frames: int = 8                      # frames kept per video (evenly spread)
    fps: float = 1.0                         # frames per second read from a video file
    prompt_format: Literal["chat", "vlm2vec"] = "chat"
    """chat: the chat template, trace, end-of-turn and invocation tokens (the TTE contract).
    vlm2vec: VLM2Vec's raw Qwen2-VL prompt, pooled at its last token (no invocation); only for
    the two-model baseline's embedder (`UnifiedTTE.separate_embedder`), e.g. a VLM2Vec checkpoint."""
    system_prompt: str | None = None
    """chat format: the system turn of every prompt (queries, candidates, traces). None: the chat
    template's own default (SmolLM2's adds 17 tokens, "You are a helpful AI assistant named
    SmolLM, ..."); "": an empty system turn."""
    think_policy: Literal["always", "never", "auto"] = "always"
    """Which queries `think_then_embed` decodes a trace for: always (every query), never (the
    direct embedding, no decode), auto (the think gate decides per query; needs a fitted gate,
    model/gate.py)."""
    answer_fallback: bool = False
    """auto: after decoding, a query whose answer looks unreliable (mean log-probability of its
    final-answer tokens below the gate's fitted threshold) keeps its direct embedding."""

    def __post_init__(self):
        if self.mode not in ("activated", "top_k"):
            raise ValueError(f"mode must be 'activated' or 'top_k', got {self.mode!r}")
        if self.think not in ("lora", "none"):
            raise ValueError(f"think must be 'lora' or 'none', got {self.think!r}")
        if self.prompt_format not in ("chat", "vlm2vec"):
            raise ValueError(f"prompt_format must be 'chat' or 'vlm2vec', got {self.prompt_format!r}")
        if self.think_policy not in THINK_POLICIES:
            raise ValueError(f"think_policy must be one of {THINK_POLICIES}, got {self.think_policy!r}")
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {self.pooling!r}")
        if isinstance(self.invocation, str):
            self.invocation = (self.invocation,)
        self.invocation = tuple(self.invocation)
        if not self.invocation:
            raise ValueError("invocation needs at least one token, e.g. ('<|embed|>',)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["invocation"] = list(self.invocation)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TTEConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def value_errors(cfg: TTEConfig) -> list[tuple[str, str]]:
    """(field, what is wrong) for each numeric field of `cfg` out of its type or range: the rules
    a recipe's `model` section and a saved tte_config.json are both held to."""
    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v

    rules = [   # field, ok, what it must be
        ("lora_r", integer(cfg.lora_r) and cfg.lora_r >= 1, "an integer >= 1"),
        ("lora_alpha", number(cfg.lora_alpha) and cfg.lora_alpha > 0, "a number > 0"),
        ("lora_dropout", number(cfg.lora_dropout) and 0 <= cfg.lora_dropout < 1, "in [0, 1)"),
        ("embed_layers", cfg.embed_layers is None or integer(cfg.embed_layers) and cfg.embed_layers >= 1,
         "an integer >= 1 or null (L // 4)"),
        ("max_length", cfg.max_length is None or integer(cfg.max_length) and cfg.max_length >= 1,
         "an integer >= 1 or null"),
        ("max_pixels", cfg.max_pixels is None or integer(cfg.max_pixels) and cfg.max_pixels >= 28 * 28,
         "an integer >= 784 (one 28 x 28 px image token) or null"),
        ("min_pixels", cfg.min_pixels is None or integer(cfg.min_pixels) and cfg.min_pixels >= 28 * 28,
         "an integer >= 784 (one 28 x 28 px image token) or null"),
        ("max_frames", integer(cfg.max_frames) and cfg.max_frames >= 1, "an integer >= 1"),
        ("fps", number(cfg.fps) and cfg.fps > 0, "a number > 0"),
        ("seed", integer(cfg.seed), "an integer"),
        ("invocation", all(isinstance(t, str) and t for t in cfg.invocation), "a list of non-empty token strings"),
        ("system_prompt", cfg.system_prompt is None or isinstance(cfg.system_prompt, str), "a string or null"),
    ]
    return [(name, f"must be {what}, got {getattr(cfg, name)!r}.") for name, ok, what in rules if not ok]
