"""Inference engine: KV cache, prefill, decode, generation, scoring."""

from cpjax.engine.engine import Engine, validate_token_ids
from cpjax.engine.kv_cache import KVCache, init_cache

__all__ = ["Engine", "KVCache", "init_cache", "validate_token_ids"]
