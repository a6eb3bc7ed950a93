"""The step bodies of inference: pure functions of ``(params, inputs, cache)`` and a forward.

Every placement runs the same bodies: a single device under ``jit`` (``Forward.ranks`` has no
axis) and a mesh under ``jit(shard_map(...))`` (each body then sees one rank's rows, cache shard
and parameter shards). What differs between them is only the attention plan the model gets
(``cpjax.parallel.ring``, ``cpjax.parallel.decode``) and the collectives over ``ranks``.

Shapes (per rank): ``T`` rows of a packed row in layout order, ``B`` decode tokens, ``L``
layers, ``C`` cache slots, ``V`` vocabulary, ``D`` model width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from cpjax.attention.masks import PAD_SEGMENT
from cpjax.config import ModelConfig
from cpjax.dispatch import AttentionImpl
from cpjax.engine import kv_cache
from cpjax.engine import sampling as sampling_lib
from cpjax.engine.kv_cache import KVCache
from cpjax.model.decoder import Decoder, Output, PastKV
from cpjax.parallel import decode as decode_lib
from cpjax.parallel.mesh import Ranks
from cpjax.parallel.ring import ring_attention

SCORE_CHUNK = 256  # tokens per chunk when turning hidden states into log-probabilities


@dataclasses.dataclass(frozen=True)
class Forward:
    """What a step needs to build the model: shapes, dtype, the attention implementation, the
    ranks of the context axis and the mesh it runs inside (whose axis sizes, with the sharding
    rules, give each parameter's local shard and the tensor-parallel sums)."""

    config: ModelConfig
    dtype: Any
    attention: AttentionImpl
    ranks: Ranks
    mesh_axis_sizes: tuple = ()  # ((axis, size), ...) of the mesh the step runs inside
    remat: Optional[str] = None  # None: inference; training: ``Decoder.remat``

    def model(self, plan: Callable) -> Decoder:
        """The model with attention ``plan`` (one rank's view of the parameters)."""
        return Decoder(
            self.config, plan, self.dtype, mesh_axis_sizes=self.mesh_axis_sizes, remat=self.remat
        )

    def ring(self, strategy: str) -> Decoder:
        """The model whose attention is the prefill ring ``strategy`` over the ranks."""
        return self.model(
            ring_attention(strategy, self.attention, self.ranks.axis, self.ranks.size)
        )


def run(
    model: Decoder, params, tokens, positions, segments, past: Optional[PastKV] = None
) -> Output:
    """The trunk: hidden states ``[T, D]`` and the new K/V ``[L, T, Hkv, Dh]``."""
    return model.apply({"params": params}, tokens, positions, segments, past)


def head(model: Decoder, params, hidden):
    """``[..., D]`` hidden states to ``[..., V]`` float32 logits."""
    return model.apply({"params": params}, hidden, method=Decoder.logits)


def token_logprobs(model: Decoder, params, hidden, targets):
    """Log-probability of ``targets [T]`` under the logits of ``hidden [T, D]``: ``[T]``.

    Computed in chunks of ``SCORE_CHUNK`` rows (the rows padded up to a multiple), so at most
    ``SCORE_CHUNK x V`` logits exist at once (Gemma's V is 262 144); under differentiation each
    chunk's logits are recomputed in the backward pass rather than kept (``jax.checkpoint``).
    """
    rows = hidden.shape[0]
    chunk = min(SCORE_CHUNK, rows)
    padded = -(-rows // chunk) * chunk
    hidden = jnp.pad(hidden, ((0, padded - rows), (0, 0)))
    targets = jnp.pad(targets, (0, padded - rows))

    @jax.checkpoint
    def chunk_logprobs(args):
        h, tgt = args
        logits = head(model, params, h)
        picked = jnp.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    lp = jax.lax.map(
        chunk_logprobs, (hidden.reshape(-1, chunk, hidden.shape[-1]), targets.reshape(-1, chunk))
    )
    return lp.reshape(-1)[:rows]


def _local(cache: KVCache) -> KVCache:
    """A rank's cache shard with its fill count as a scalar (``fill`` is ``[ranks]``)."""
    return cache._replace(fill=cache.fill[0])


def _global(cache: KVCache) -> KVCache:
    return cache._replace(fill=cache.fill[None])


def _store(local: KVCache, out: Output, positions, segments, keep) -> KVCache:
    """Append the new rows marked ``keep [T]`` to a rank's cache shard, kept rows first; the
    other rows are written as padding behind them and overwritten by the next append."""
    order = jnp.argsort(~keep, stable=True)
    segs = jnp.where(keep, segments, PAD_SEGMENT)
    return kv_cache.append(
        local,
        out.k[:, order],
        out.v[:, order],
        positions[order],
        segs[order],
        keep.sum().astype(jnp.int32),
    )


def _past(local: KVCache, window: Optional[int]) -> Optional[PastKV]:
    """The first ``window`` slots of a rank's cache (all of them for None; nothing for 0)."""
    if window == 0:
        return None
    if window is None:
        return local.as_past()
    return PastKV(local.k[:, :window], local.v[:, :window], local.pos[:window], local.seg[:window])


# ------------------------------------------------------------------------- prefill bodies
def prefill(
    fwd: Forward,
    strategy: str,
    window: Optional[int],
    params,
    tokens,
    positions,
    segments,
    cache: KVCache,
):
    """(Partial) prefill: the new rows ``[T]`` attend each other and the first ``window``
    slots of every rank's cache (by the ring ``strategy``), and are appended to this rank's
    shard. Returns ``(hidden [T, D], cache)``."""
    local = _local(cache)
    out = run(fwd.ring(strategy), params, tokens, positions, segments, _past(local, window))
    return out.hidden, _global(_store(local, out, positions, segments, segments >= 0))


def prefill_logprobs(
    fwd: Forward,
    strategy: str,
    window: Optional[int],
    params,
    tokens,
    targets,
    positions,
    segments,
    cache: KVCache,
):
    """:func:`prefill` that also scores ``targets [T]``: ``(logprobs [T], cache)``."""
    hidden, cache = prefill(fwd, strategy, window, params, tokens, positions, segments, cache)
    return token_logprobs(fwd.ring(strategy), params, hidden, targets), cache


def score(fwd: Forward, strategy: str, params, tokens, targets, positions, segments):
    """Log-probability of ``targets[t]`` after the row's tokens visible to ``t``: ``[T]``."""
    model = fwd.ring(strategy)
    return token_logprobs(
        model, params, run(model, params, tokens, positions, segments).hidden, targets
    )


def logits(fwd: Forward, strategy: str, params, tokens, positions, segments):
    """``[T, V]`` float32 logits of a packed row (no cache)."""
    model = fwd.ring(strategy)
    return head(model, params, run(model, params, tokens, positions, segments).hidden)


# ------------------------------------------------------------------------- decode bodies
def replicated_decode(
    fwd: Forward,
    params,
    tokens,
    positions,
    segments,
    step,
    cache: KVCache,
    key,
    temperature,
    top_k,
    top_p,
):
    """One token for each of ``B`` sequences with the queries on every rank.

    Every rank runs all ``B`` tokens, attends its cache shard, the partials merge across ranks
    (on one device: plain attention over the cache); each token is stored on its owner
    (``decode_owners``). Returns ``(logits [B, V], next tokens [B], cache)``.
    """
    local = _local(cache)
    batch, rank = tokens.shape[0], fwd.ranks.index()
    owners = decode_lib.decode_owners(fwd.ranks.all_gather(local.fill), step, batch)
    model = fwd.model(
        decode_lib.replicated_decode_attention(fwd.attention.attend, fwd.ranks, owners == rank)
    )
    out = run(model, params, tokens, positions, segments, local.as_past())
    logits_ = head(model, params, out.hidden)
    next_tokens = sampling_lib.sample(
        logits_, key, step + 1, jnp.arange(batch), temperature, top_k, top_p
    )
    rows, real = decode_lib.owned_slots(owners, rank, fwd.ranks.size)
    out = Output(out.hidden, out.k[:, rows], out.v[:, rows])
    local = _store(local, out, positions[rows], segments[rows], real)
    return logits_, next_tokens, _global(local)


def ring_decode(
    fwd: Forward,
    params,
    tokens,
    positions,
    segments,
    step,
    cache: KVCache,
    key,
    temperature,
    top_k,
    top_p,
):
    """The paper's batched ring pass-Q decode.

    Each rank takes the queries of the tokens it owns (``decode_owners``), padded to
    ``ceil(B / N)`` rows; a pass-Q ring visits every cache shard, one all-to-all returns the
    partials, and the ranks exchange their sampled tokens and logits. Each token's K/V stays on
    the rank that computed it. Returns ``(logits [B, V], next tokens [B], cache)``.
    """
    batch = tokens.shape[0]
    local = _local(cache)
    owners = decode_lib.decode_owners(fwd.ranks.all_gather(local.fill), step, batch)
    mine, real = decode_lib.owned_slots(owners, fwd.ranks.index(), fwd.ranks.size)
    my_segments = decode_lib.owned_segments(segments[mine], real)
    model = fwd.ring("pass_q")
    out = run(model, params, tokens[mine], positions[mine], my_segments, local.as_past())
    my_logits = head(model, params, out.hidden)
    my_next = sampling_lib.sample(my_logits, key, step + 1, mine, temperature, top_k, top_p)
    local = _store(local, out, positions[mine], my_segments, real)
    where = fwd.ranks.all_gather(jnp.where(real, mine, batch), tiled=True)  # batch: dropped
    all_tokens = (
        jnp.zeros((batch,), jnp.int32)
        .at[where]
        .set(fwd.ranks.all_gather(my_next, tiled=True), mode="drop")
    )
    all_logits = (
        jnp.zeros((batch, my_logits.shape[-1]), my_logits.dtype)
        .at[where]
        .set(fwd.ranks.all_gather(my_logits, tiled=True), mode="drop")
    )
    return all_logits, all_tokens, _global(local)


DECODE_BODIES = {"allreduce": replicated_decode, "ring_pass_q": ring_decode}
