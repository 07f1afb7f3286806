"""unified_tte: Think-Then-Embed with one backbone, a `think` and an `embed` LoRA, and KV reuse.

    from unified_tte import UnifiedTTE, TTEInput
"""
from .inputs import InputError, Trace, TTEInput
from .model import ThinkOutput, TTEConfig, UnifiedTTE

__all__ = ["UnifiedTTE", "TTEConfig", "TTEInput", "Trace", "ThinkOutput", "InputError"]
__version__ = "0.1.0"
