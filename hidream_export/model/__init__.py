"""HiDream-I1 reference transformer, written for export. Imports nothing else of hidream_export.

The names below load on first use, so `hidream_export.model.config` (plain dataclasses) can be read by
torch-free code such as the runtime.
"""

import importlib

_EXPORTS = {
    "PRESETS": "config", "TransformerConfig": "config", "ConfigError": "config", "get_preset": "config",
    "resolve_config": "config",
    "MOE_LOWERINGS": "moe",
    "HiDreamTransformer": "transformer", "TransformerParts": "transformer",
    "CheckpointError": "checkpoint", "load_transformer": "checkpoint", "locate_checkpoint": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
