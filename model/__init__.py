"""HiDream-I1 reference transformer (imported as `hidream_export.model`)."""

from .config import PRESETS, TransformerConfig, get_preset, resolve_config
from .moe import MOE_LOWERINGS
from .transformer import HiDreamTransformer

__all__ = ["PRESETS", "TransformerConfig", "get_preset", "resolve_config", "MOE_LOWERINGS", "HiDreamTransformer"]
