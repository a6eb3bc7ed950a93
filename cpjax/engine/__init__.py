"""Inference engine: one ``Engine`` over a placement (one device or a context-parallel mesh)."""

from cpjax.engine.engine import Engine
from cpjax.engine.kv_cache import KVCache
from cpjax.engine.placement import ContextParallel, SingleDevice

__all__ = ["ContextParallel", "Engine", "KVCache", "SingleDevice"]
