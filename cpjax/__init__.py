"""cpjax: context-parallel long-context LLM inference in JAX."""

__version__ = "0.1.0"
