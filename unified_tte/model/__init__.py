"""The core: one backbone with a `think` and an `embed` adapter and the forward path.

    from unified_tte.model import UnifiedTTE, TTEConfig, TTEInput, zoo
    tte = UnifiedTTE(zoo.load("tiny"), mode="activated")

Modules, lowest first: config (TTEConfig), inputs (TTEInput, the collator), backbones (loading
local folders, the decoder stack, the weight hash), zoo (the built-in backbones), adapters (PEFT),
engine (KV cache, decode loop), checkpoint (reading exported checkpoints and run folders), tte
(UnifiedTTE: the forward-path contract).
"""
from .config import TTEConfig
from .engine import ThinkState
from .inputs import Trace, TTEInput
from .tte import ThinkOutput, UnifiedTTE

__all__ = ["UnifiedTTE", "TTEConfig", "TTEInput", "Trace", "ThinkOutput", "ThinkState"]
