"""rawcast.model: config, loader, Gemma 4 Unified backbone, KV cache, tokenizer."""

from rawcast.model.cache import CacheSpec, KVCache
from rawcast.model.config import ModelConfig, preset
from rawcast.model.gemma4 import Append, Gemma4Unified
from rawcast.model.loader import CheckpointError, load

__all__ = [
    "Append",
    "CacheSpec",
    "CheckpointError",
    "Gemma4Unified",
    "KVCache",
    "ModelConfig",
    "load",
    "preset",
]
