"""Hopper flash attention through Pallas Mosaic GPU: TMA loads, warpgroup matmuls, a visit list.

``flash_attention_mgpu(q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out, lse)`` has the contract of
``cpjax.attention.reference.attend`` and of the Triton kernel ``pallas_kernels.flash_attention``;
it differs in how the work reaches the tensor cores:

* grid ``(query blocks of 64 rows, query heads)``; one warpgroup per program (a 64-row ``wgmma``
  tile); query head ``h`` reads K/V head ``h // G`` (GQA without repeating K/V);
* the wrapper computes, with XLA, each query block's *visit list*: the key blocks its
  positions and segments may see (``cpjax.attention.masks.visible_block_schedule``). The
  kernel loops over that list only, so an invisible block is neither loaded nor computed: causal
  attention does half the work and a ring step against a block wholly in the future costs one
  empty loop;
* K, V and their positions/segments stream from global to shared memory by TMA into ``slots``
  buffers (the next blocks load while the current one computes); ``Q K^T`` and ``P V`` are
  ``wgmma`` ops on swizzled shared-memory tiles (``P`` from registers);
* the mask of a loaded block is ``cpjax.attention.masks.visible`` on the broadcast position
  and segment tiles; float32 online-softmax statistics in base 2; a row that sees no key
  returns ``out = 0`` and ``lse = -inf``.

Inputs: bf16 or fp16, head_dim a multiple of 64, any ``Tq``, ``Tk`` (padded to the blocks).

On CPU it runs in Pallas' Mosaic GPU interpreter (``interpret=True``), which simulates shared
memory, TMA copies and barriers but has no ``wgmma`` with a transposed or register operand; there
the two matmuls are plain ``jnp.dot`` of the same shared-memory tiles. Everything else (visit
lists, TMA slices, slots and barriers, masks, softmax, the epilogue) is the code the GPU runs;
``tests/test_kernel_lowering.py`` lowers the compiled form for CUDA on CPU.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from cpjax.attention.masks import PAD_SEGMENT, check_attend_inputs, visible, visible_block_schedule
from cpjax.attention.padding import pad_kv_rows, pad_query_rows, pad_rows
from cpjax.errors import require
from pallas_kernels.flash_attention import _LN2, _LOG2E, _MASKED, default_interpret

BLOCK_Q = 64  # rows of one warpgroup matmul
MAX_SMEM_BYTES = 232448  # dynamic shared memory of one H100 thread block (227 KB)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
_SWIZZLE_BYTES = 128


def check_inputs(q, k, block_k: int, slots: int) -> None:
    """Raise ``CpjaxError`` naming the rule when the Hopper kernel cannot take these inputs."""
    require(
        q.dtype in map(jnp.dtype, SUPPORTED_DTYPES) and k.dtype == q.dtype,
        f"flash_attention_mgpu (attention 'pallas_mgpu') takes bf16 or fp16 q/k/v of one "
        f"dtype, got q {q.dtype}, k {k.dtype}: run the model in bf16 or use 'pallas'",
    )
    require(
        q.shape[-1] % 64 == 0,
        f"flash_attention_mgpu needs head_dim a multiple of 64, got {q.shape[-1]}: use 'pallas'",
    )
    require(
        block_k > 0 and block_k % 64 == 0, f"block_k={block_k}: must be a positive multiple of 64"
    )
    require(slots >= 1, f"slots={slots}: must be >= 1")
    d, itemsize = q.shape[-1], jnp.dtype(q.dtype).itemsize
    smem = itemsize * d * (BLOCK_Q + 2 * slots * block_k) + 4 * (3 * BLOCK_Q + 2 * slots * block_k)
    require(
        smem <= MAX_SMEM_BYTES,
        f"flash_attention_mgpu: head_dim {d} with block_k={block_k} and slots={slots} needs "
        f"{smem} bytes of shared memory, more than the {MAX_SMEM_BYTES} of an H100 block: "
        f"use smaller blocks or fewer slots (head_dim 256: block_k=64, slots=2), or 'pallas'",
    )


def _check_device() -> None:
    """On a GPU backend, the device must be a Hopper (sm_90) or newer: ``wgmma`` and TMA."""
    if jax.default_backend() != "gpu":
        return  # interpreted, or lowered for CUDA ahead of time
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    require(
        capability is not None and float(capability) >= 9.0,
        f"flash_attention_mgpu (attention 'pallas_mgpu') needs a Hopper (sm_90) or newer "
        f"GPU; {device.device_kind} has compute capability {capability}: use 'pallas'",
    )


def _kernel(
    blocks_ref,
    counts_ref,
    q_ref,
    k_ref,
    v_ref,
    q_pos_ref,
    q_seg_ref,
    kv_pos_ref,
    kv_seg_ref,
    out_ref,
    lse_ref,
    q_smem,
    k_smem,
    v_smem,
    q_pos_smem,
    q_seg_smem,
    kv_pos_smem,
    kv_seg_smem,
    lse_smem,
    q_barriers,
    k_barriers,
    v_barriers,
    kv_pos_barriers,
    kv_seg_barriers,
    *,
    group: int,
    block_k: int,
    slots: int,
    window: Optional[int],
    interpret: bool,
):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    # The interpreter has no layout casts and no wgmma with a transposed or register operand.
    cast = (lambda x, _layout: x) if interpret else plgpu.layout_cast
    rows_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per query row
    cols_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per key column
    block_q, d = q_smem.shape
    scores_shape = (block_q, block_k)
    scale = _LOG2E / math.sqrt(d)

    qi = lax.axis_index("q_blocks")
    head = lax.axis_index("heads")
    kv_head = lax.div(head, jnp.array(group, head.dtype))
    q_rows = pl.ds(pl.multiple_of(qi * block_q, block_q), block_q)
    n_visits = counts_ref[qi]

    plgpu.copy_gmem_to_smem(q_ref.at[q_rows, head], q_smem, q_barriers.at[0])
    plgpu.copy_gmem_to_smem(q_pos_ref.at[q_rows], q_pos_smem, q_barriers.at[1])
    plgpu.copy_gmem_to_smem(q_seg_ref.at[q_rows], q_seg_smem, q_barriers.at[2])

    def fetch(visit, slot):
        kv_rows = pl.ds(pl.multiple_of(blocks_ref[qi, visit] * block_k, block_k), block_k)
        plgpu.copy_gmem_to_smem(k_ref.at[kv_rows, kv_head], k_smem.at[slot], k_barriers.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[kv_rows, kv_head], v_smem.at[slot], v_barriers.at[slot])
        plgpu.copy_gmem_to_smem(
            kv_pos_ref.at[kv_rows], kv_pos_smem.at[slot], kv_pos_barriers.at[slot]
        )
        plgpu.copy_gmem_to_smem(
            kv_seg_ref.at[kv_rows], kv_seg_smem.at[slot], kv_seg_barriers.at[slot]
        )

    for slot in range(slots):
        pl.when(slot < n_visits)(functools.partial(fetch, slot, slot))

    for i in range(3):
        plgpu.barrier_wait(q_barriers.at[i])
    q_pos = lax.broadcast_in_dim(cast(q_pos_smem[...], rows_layout), scores_shape, [0])
    q_seg = lax.broadcast_in_dim(cast(q_seg_smem[...], rows_layout), scores_shape, [0])

    def scores(slot):
        if interpret:
            return jnp.dot(q_smem[...], k_smem[slot].T, preferred_element_type=jnp.float32)

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            return acc_ref[...]

        return pl.run_scoped(qk, plgpu.ACC(scores_shape, jnp.float32))

    def weighted_values(p, slot):
        if interpret:
            return jnp.dot(p, v_smem[slot], preferred_element_type=jnp.float32)

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p, v_smem.at[slot])
            return acc_ref[...]

        return pl.run_scoped(pv, plgpu.ACC((block_q, d), jnp.float32))

    def visit(step, carry):
        acc, m, l = carry
        slot = lax.rem(step, jnp.array(slots, step.dtype))
        plgpu.barrier_wait(kv_pos_barriers.at[slot])
        plgpu.barrier_wait(kv_seg_barriers.at[slot])
        kv_pos = lax.broadcast_in_dim(cast(kv_pos_smem[slot], cols_layout), scores_shape, [1])
        kv_seg = lax.broadcast_in_dim(cast(kv_seg_smem[slot], cols_layout), scores_shape, [1])
        mask = visible(q_pos, kv_pos, q_seg, kv_seg, window)
        plgpu.barrier_wait(k_barriers.at[slot])
        s = jnp.where(mask, scores(slot) * scale, _MASKED)
        m_next = jnp.maximum(m, s.max(axis=1))
        correction = jnp.exp2(m - m_next)
        p = jnp.where(mask, jnp.exp2(s - lax.broadcast_in_dim(m_next, scores_shape, [0])), 0.0)
        l_next = l * correction + p.sum(axis=1)
        plgpu.barrier_wait(v_barriers.at[slot])
        acc_next = acc * lax.broadcast_in_dim(correction, acc.shape, [0]) + weighted_values(
            p.astype(q_smem.dtype), slot
        )
        # The slot's tiles are consumed (reading the accumulators waited for the matmuls).
        pl.when(step + slots < n_visits)(lambda: fetch(step + slots, slot))
        return acc_next, m_next, l_next

    init = (
        cast(jnp.zeros((block_q, d), jnp.float32), plgpu.Layout.WGMMA),
        cast(jnp.full((block_q,), _MASKED, jnp.float32), rows_layout),
        cast(jnp.zeros((block_q,), jnp.float32), rows_layout),
    )
    acc, m, l = lax.fori_loop(0, n_visits, visit, init)

    seen = l != 0  # NaN counts as seen: a NaN input must surface, not vanish
    safe_l = jnp.where(seen, l, 1.0)
    out = acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])
    out = jnp.where(lax.broadcast_in_dim(seen, acc.shape, [0]), out, 0.0)
    q_smem[...] = out.astype(q_smem.dtype)  # the query tile is spent: stage the output
    lse_smem[...] = jnp.where(seen, (m + jnp.log2(safe_l)) * _LN2, -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, out_ref.at[q_rows, head])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[head, q_rows])
    plgpu.wait_smem_to_gmem(0)


def visit_lists(q_pos, kv_pos, q_seg, kv_seg, block_k: int = 64, window: Optional[int] = None):
    """The key blocks the kernel visits: ``(blocks [n_q, n_k], counts [n_q])`` int32 for query
    blocks of ``BLOCK_Q`` rows and key blocks of ``block_k`` rows; query block ``i`` visits
    ``blocks[i, :counts[i]]`` (``masks.visible_block_schedule``).

    ``q_pos, q_seg [Tq]``, ``kv_pos, kv_seg [Tk]`` int32, padded here as the kernel pads them.
    """
    q_pos, q_seg = pad_rows(q_pos, BLOCK_Q, 0), pad_rows(q_seg, BLOCK_Q, PAD_SEGMENT)
    kv_pos, kv_seg = pad_rows(kv_pos, block_k, 0), pad_rows(kv_seg, block_k, PAD_SEGMENT)
    return visible_block_schedule(q_pos, kv_pos, q_seg, kv_seg, BLOCK_Q, block_k, window)


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


@functools.partial(jax.jit, static_argnames=("block_k", "slots", "window", "interpret"))
def flash_attention_mgpu(
    q,
    k,
    v,
    q_pos,
    kv_pos,
    q_seg,
    kv_seg,
    *,
    block_k: int = 64,
    slots: int = 2,
    window: Optional[int] = None,
    interpret: Optional[bool] = None,
):
    """Blockwise masked GQA attention in one Mosaic GPU (Hopper) kernel.

    Args:
      q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]``; bf16/fp16, ``D % 64 == 0``, ``Hq % Hkv == 0``.
      q_pos, kv_pos: ``[Tq]``, ``[Tk]`` int32 global positions.
      q_seg, kv_seg: ``[Tq]``, ``[Tk]`` int32 segment ids (negative = padding).
      block_k: key rows per block (a multiple of 64); queries go by 64 rows.
      slots: shared-memory buffers for K/V blocks in flight.
      window: optional sliding window.
      interpret: run in the Mosaic GPU interpreter (default: unless on a GPU).

    Returns:
      ``(out [Tq, Hq, D] in q.dtype, lse [Tq, Hq] float32 natural-log)``.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    check_attend_inputs(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    check_inputs(q, k, block_k, slots)
    if interpret is None:
        interpret = default_interpret()
    if not interpret:
        _check_device()
    tq, hq, d = q.shape
    hkv = k.shape[1]
    qp, q_pos_p, q_seg_p = pad_query_rows(q, q_pos, q_seg, BLOCK_Q)
    kp, vp, kv_pos_p, kv_seg_p = pad_kv_rows(k, v, kv_pos, kv_seg, block_k)
    tq_p = qp.shape[0]
    blocks, counts = visit_lists(q_pos_p, kv_pos_p, q_seg_p, kv_seg_p, block_k, window)

    tiles = (
        plgpu.TilingTransform((8, _SWIZZLE_BYTES // q.dtype.itemsize)),
        plgpu.SwizzleTransform(_SWIZZLE_BYTES),
    )
    kernel = functools.partial(
        _kernel, group=hq // hkv, block_k=block_k, slots=slots, window=window, interpret=interpret
    )
    out, lse = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((tq_p, hq, d), q.dtype),
            jax.ShapeDtypeStruct((hq, tq_p), jnp.float32),
        ),
        scratch_types=(
            plgpu.SMEM((BLOCK_Q, d), q.dtype, transforms=tiles),  # q, then out
            plgpu.SMEM((slots, block_k, d), q.dtype, transforms=tiles),  # k
            plgpu.SMEM((slots, block_k, d), q.dtype, transforms=tiles),  # v
            plgpu.SMEM((BLOCK_Q,), jnp.int32),
            plgpu.SMEM((BLOCK_Q,), jnp.int32),
            plgpu.SMEM((slots, block_k), jnp.int32),
            plgpu.SMEM((slots, block_k), jnp.int32),
            plgpu.SMEM((BLOCK_Q,), jnp.float32),  # lse
            plgpu.Barrier(num_barriers=3),
            *(plgpu.Barrier(num_barriers=slots) for _ in range(4)),
        ),
        grid=(tq_p // BLOCK_Q, hq),
        grid_names=("q_blocks", "heads"),
        interpret=_interpret_params() if interpret else None,
    )(blocks, counts, qp, kp, vp, q_pos_p, q_seg_p, kv_pos_p, kv_seg_p)
    return out[:tq], lse.T[:tq]
