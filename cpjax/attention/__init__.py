"""Attention: the ``attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out, lse)`` contract.

Implementations (modules of this package): ``reference`` (the dense jnp oracle), ``blockwise``
(online softmax over key blocks in plain XLA, skipping masked blocks) and ``cudnn``
(``jax.nn.dot_product_attention``, for comparison); the Pallas kernels live in
``pallas_kernels``. ``masks`` holds the visibility rule and the block-bounds test, ``padding``
the block padding, ``merge`` the log-sum-exp merge, ``plans`` the single-device plan of the
model. Choosing an implementation by name is ``cpjax.dispatch`` (above this package and the
kernels): this package imports no dispatch and no kernel.
"""

from cpjax.attention.merge import merge
from cpjax.attention.plans import with_past

__all__ = ["merge", "with_past"]
