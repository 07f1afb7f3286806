"""unified_tte: Think-Then-Embed with one backbone, a `think` and an `embed` LoRA, and KV reuse.

    from unified_tte import UnifiedTTE, TTEInput

The layers and which way imports go: ARCHITECTURE.md at the repository root.
"""
from .errors import InputError
from .model import ThinkOutput, Trace, TTEConfig, TTEInput, UnifiedTTE

__all__ = ["UnifiedTTE", "TTEConfig", "TTEInput", "Trace", "ThinkOutput", "InputError"]
__version__ = "0.1.0"
