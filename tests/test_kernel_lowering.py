"""The GPU lowering of the Pallas kernels (Triton; Mosaic GPU for the Hopper kernel), checked on
a CPU-only machine.

``jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",))`` runs the Pallas -> Triton
lowering rules in Python without a GPU: each kernel's jaxpr becomes Triton MLIR, serialized
into one ``stablehlo.custom_call @__gpu$xla.gpu.triton``. Inputs are ``jax.ShapeDtypeStruct``s,
so nothing is allocated and even the benchmark's 1M-token cache costs nothing.

What this catches: a primitive the Triton lowering does not support; an array loaded or
computed inside the kernel whose size is not a power of two (block sizes, head dims); dtype
mismatches in dots; a kernel that silently runs interpreted or through another backend (the
Triton custom call is then missing or doubled); the launch grid and compiler parameters.

The Hopper kernel (``flash_attention_mgpu``) lowers the same way into one
``stablehlo.custom_call @mosaic_gpu_v2``: its TMA slices, shared-memory tiles and swizzles,
register layouts of the masks and softmax, and the ``wgmma`` operands are checked at this step.

What it cannot catch: everything after the Triton IR is handed to XLA -- Triton's passes and
the PTX/SASS compilation (minimum dot tiles: the kernels ask for blocks >= 16 on a GPU, yet a
block of 8 lowers here; shared-memory or register limits of a block/num_warps/num_stages
choice) -- and everything at run time: numerics (TF32 in fp32 dots), out-of-bounds accesses,
speed. Those need a GPU: ``tests/test_pallas_kernels.py`` compiles and runs the kernels there
(``experiments/gpu_check.sh``).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from cpjax.errors import CpjaxError
from pallas_kernels import (
    decode_attention,
    flash_attention,
    flash_attention_grads,
    flash_attention_mgpu,
)

TRITON_CALL = "stablehlo.custom_call @__gpu$xla.gpu.triton("
S = jax.ShapeDtypeStruct
I32 = jnp.int32


def lower_for_cuda(fn, *shape_dtype_structs) -> str:
    """The StableHLO text of ``jax.jit(fn)`` lowered for CUDA (works on a CPU-only machine)."""
    traced = jax.jit(fn).trace(*shape_dtype_structs)
    return traced.lower(lowering_platforms=("cuda",)).as_text()


def triton_calls(text: str) -> list:
    """``(name, (grid_x, grid_y, grid_z), num_warps)`` of each Triton custom call in ``text``."""
    calls = []
    for line in text.splitlines():
        if TRITON_CALL not in line:
            continue
        config = re.sub(r'ir = "(?:[^"\\]|\\.)*"', "", line)  # drop the serialized Triton IR

        def field(key, config=config):
            return re.search(rf"\b{key} = (\"\w+\"|\d+)", config).group(1).strip('"')

        calls.append(
            (field("name"), tuple(int(field(f"grid_{a}")) for a in "xyz"), int(field("num_warps")))
        )
    return calls


def flash_shapes(t, hq, hkv, d, dtype):
    q, kv, rows = S((t, hq, d), dtype), S((t, hkv, d), dtype), S((t,), I32)
    return q, kv, kv, rows, rows, rows, rows  # q, k, v, q_pos, kv_pos, q_seg, kv_seg


def decode_shapes(tq, cache, hq, hkv, d, dtype):
    kv, slots, new = S((cache, hkv, d), dtype), S((cache,), I32), S((tq,), I32)
    return S((tq, hq, d), dtype), kv, kv, new, slots, new, slots


DTYPES = pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
HEAD_DIMS = pytest.mark.parametrize("d", [64, 128, 256])  # 256: Gemma 3
HEADS = pytest.mark.parametrize("hq, hkv", [(32, 8), (9, 3)], ids=["32q8kv", "9q3kv_smollm2"])


@DTYPES
@HEAD_DIMS
@HEADS
@pytest.mark.parametrize("t", [1000, 4097])
@pytest.mark.parametrize(
    "block_q, block_k, window", [(128, 64, None), (64, 64, None), (64, 64, 256)]
)
def test_flash_attention_lowers_to_one_triton_call(dtype, d, hq, hkv, t, block_q, block_k, window):
    text = lower_for_cuda(
        lambda *a: flash_attention(
            *a, block_q=block_q, block_k=block_k, window=window, interpret=False
        ),
        *flash_shapes(t, hq, hkv, d, dtype),
    )
    assert triton_calls(text) == [
        ("cpjax_flash_attention", (-(-t // block_q), hq, 1), 4 if d <= 64 else 8)
    ]


def flash_grads_shapes(t, hq, hkv, d, dtype):
    """The arguments of ``flash_attention_grads``: the forward's, then ``out, lse, d_out,
    d_lse`` (``d_lse`` and ``lse`` float32)."""
    q, *rest = flash_shapes(t, hq, hkv, d, dtype)
    lse = S((t, hq), jnp.float32)
    return q, *rest, q, lse, q, lse


@DTYPES
@HEAD_DIMS
@HEADS
@pytest.mark.parametrize("t", [1000, 4097])
@pytest.mark.parametrize(
    "block_q, block_k, window", [(128, 64, None), (64, 64, None), (64, 64, 256)]
)
def test_flash_attention_grads_lower_to_two_triton_calls(
    dtype, d, hq, hkv, t, block_q, block_k, window
):
    """The backward: dk/dv over key blocks and KV heads (the G query heads of a KV head in the
    program, G = 3 included), then dq over query blocks and query heads."""
    text = lower_for_cuda(
        lambda *a: flash_attention_grads(
            *a, block_q=block_q, block_k=block_k, window=window, interpret=False
        ),
        *flash_grads_shapes(t, hq, hkv, d, dtype),
    )
    warps = 4 if d <= 64 else 8
    assert triton_calls(text) == [
        ("cpjax_flash_attention_dkdv", (-(-t // block_k), hkv, 1), warps),
        ("cpjax_flash_attention_dq", (-(-t // block_q), hq, 1), warps),
    ]


@DTYPES
@HEAD_DIMS
@HEADS
@pytest.mark.parametrize("tq", [1, 4])
def test_decode_attention_lowers_to_one_triton_call(dtype, d, hq, hkv, tq):
    # 5000 slots in 16 splits of 128-row tiles: chunks of 384 rows, not a power of two; only
    # the tiles the kernel loads (128 rows) must be.
    text = lower_for_cuda(
        lambda *a: decode_attention(*a, n_splits=16, block_k=128, interpret=False),
        *decode_shapes(tq, 5000, hq, hkv, d, dtype),
    )
    assert triton_calls(text) == [("cpjax_decode_attention", (hkv, 16, 1), 4)]


@pytest.mark.parametrize("t", [4096, 16384, 65536, 131072])
def test_benchmark_prefill_shapes_lower(t):
    """``experiments/bench_kernels.py --platform gpu``: bf16, 32/8 heads, D 128, blocks 128/64."""
    text = lower_for_cuda(
        lambda *a: flash_attention(*a, block_q=128, block_k=64, interpret=False)[0],
        *flash_shapes(t, 32, 8, 128, jnp.bfloat16),
    )
    assert triton_calls(text) == [("cpjax_flash_attention", (t // 128, 32, 1), 8)]


@pytest.mark.parametrize("cache", [32768, 131072, 524288, 1048576])
def test_benchmark_decode_shapes_lower(cache):
    """``experiments/bench_kernels.py --platform gpu``: one query, bf16, 32/8 heads, D 128."""
    text = lower_for_cuda(
        lambda *a: decode_attention(*a, block_k=128, interpret=False)[0],
        *decode_shapes(1, cache, 32, 8, 128, jnp.bfloat16),
    )
    assert triton_calls(text) == [("cpjax_decode_attention", (8, 16, 1), 4)]


@pytest.fixture
def compiled_kernels(monkeypatch):
    """``cpjax.dispatch.pallas_attend`` (and its backward) as on a GPU: the kernels with
    ``interpret=False`` and their default block sizes (it imports them from ``pallas_kernels``
    at each call)."""
    monkeypatch.setattr(
        pallas_kernels, "flash_attention", functools.partial(flash_attention, interpret=False)
    )
    monkeypatch.setattr(
        pallas_kernels, "decode_attention", functools.partial(decode_attention, interpret=False)
    )
    monkeypatch.setattr(
        pallas_kernels,
        "flash_attention_grads",
        functools.partial(flash_attention_grads, interpret=False),
    )


@pytest.mark.parametrize("preset", ["tiny", "smollm2-135m", "llama3-8b", "llama3-405b"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
def test_model_forward_with_pallas_attention_lowers(compiled_kernels, preset, dtype):
    """One layer of a preset model, ``attention="pallas"`` as the engine builds it: a 1000-token
    prefill (flash kernel), then 1, 16 (decode kernel) and 17 (flash) new tokens against a
    5000-slot cache -- one kernel for the new rows, one for the cache."""
    from cpjax.attention import with_past
    from cpjax.config import PRESETS
    from cpjax.dispatch import pallas_attend
    from cpjax.model.decoder import Decoder, PastKV, param_shapes

    cfg = dataclasses.replace(PRESETS[preset], n_layers=1)
    model = Decoder(cfg, with_past(pallas_attend), dtype)
    params = param_shapes(cfg, dtype)

    def forward(params, *rows_and_past):
        return model.apply({"params": params}, *rows_and_past)

    rows = S((1000,), I32)
    calls = triton_calls(lower_for_cuda(forward, params, rows, rows, rows))
    assert [name for name, _, _ in calls] == ["cpjax_flash_attention"]
    kv, slots = S((1, 5000, cfg.n_kv_heads, cfg.head_dim), dtype), S((5000,), I32)
    for t, kernel in ((1, "decode"), (16, "decode"), (17, "flash")):
        rows = S((t,), I32)
        calls = triton_calls(
            lower_for_cuda(forward, params, rows, rows, rows, PastKV(kv, kv, slots, slots))
        )
        assert [name for name, _, _ in calls] == [f"cpjax_{kernel}_attention"] * 2, t


@pytest.mark.parametrize("preset", ["tiny", "smollm2-135m"])
def test_model_grad_with_pallas_attention_lowers(compiled_kernels, preset):
    """The gradient of one bf16 layer, ``attention="pallas"`` (its custom VJP): a 1000-token
    forward is the flash kernel, the backward its dk/dv and dq kernels."""
    from cpjax.attention import with_past
    from cpjax.config import PRESETS
    from cpjax.dispatch import pallas_attend
    from cpjax.model.decoder import Decoder, param_shapes

    cfg = dataclasses.replace(PRESETS[preset], n_layers=1)
    model = Decoder(cfg, with_past(pallas_attend), jnp.bfloat16)

    def loss(params, *rows):
        return jnp.sum(model.apply({"params": params}, *rows).hidden.astype(jnp.float32))

    rows = S((1000,), I32)
    calls = triton_calls(
        lower_for_cuda(jax.grad(loss), param_shapes(cfg, jnp.bfloat16), rows, rows, rows)
    )
    assert [name for name, _, _ in calls] == [
        "cpjax_flash_attention",
        "cpjax_flash_attention_dkdv",
        "cpjax_flash_attention_dq",
    ]


def test_gemma3_forward_lowers_one_kernel_per_layer_kind(compiled_kernels):
    """Gemma 3 (head_dim 256, 1 KV head, sliding and global layers): the layer scan switches
    between two attention plans, each one kernel call with its own static window."""
    from cpjax.attention import with_past
    from cpjax.config import PRESETS
    from cpjax.dispatch import pallas_attend
    from cpjax.model.decoder import Decoder, PastKV, param_shapes

    gemma = PRESETS["gemma3-270m"]
    cfg = dataclasses.replace(gemma, n_layers=6, layer_types=gemma.layer_types[:6])
    assert cfg.attention_kinds == ("full", "sliding")
    model = Decoder(cfg, with_past(pallas_attend), jnp.bfloat16)
    params = param_shapes(cfg, jnp.bfloat16)

    def forward(params, *rows_and_past):
        return model.apply({"params": params}, *rows_and_past)

    rows = S((1000,), I32)
    calls = triton_calls(lower_for_cuda(forward, params, rows, rows, rows))
    assert [name for name, _, _ in calls] == ["cpjax_flash_attention"] * 2
    kv, slots = S((6, 5000, 1, 256), jnp.bfloat16), S((5000,), I32)
    rows = S((1,), I32)
    calls = triton_calls(
        lower_for_cuda(forward, params, rows, rows, rows, PastKV(kv, kv, slots, slots))
    )
    assert [name for name, _, _ in calls] == ["cpjax_decode_attention"] * 4


def test_interpret_mode_lowers_without_triton():
    """The helper tells the two modes apart: interpreted, the kernel is plain XLA."""
    text = lower_for_cuda(
        lambda *a: flash_attention(*a, block_q=64, block_k=64, interpret=True),
        *flash_shapes(100, 4, 2, 64, jnp.float32),
    )
    assert TRITON_CALL not in text and "custom_call" not in text


POWER_OF_TWO_ERROR = "size is a power of 2"


@pytest.mark.parametrize(
    "block_q, block_k, d, bad_shape",
    [
        (48, 64, 128, "(48, 128)"),  # query tile
        (64, 48, 128, "(48,)"),  # key tile (its positions are loaded first)
        (64, 64, 96, "(64, 96)"),  # head_dim 96: no preset has it, but e.g. 80/96 exist
    ],
)
def test_flash_attention_non_power_of_two_fails_at_lowering(block_q, block_k, d, bad_shape):
    with pytest.raises(ValueError, match=POWER_OF_TWO_ERROR) as info:
        lower_for_cuda(
            lambda *a: flash_attention(*a, block_q=block_q, block_k=block_k, interpret=False),
            *flash_shapes(1000, 8, 2, d, jnp.bfloat16),
        )
    assert bad_shape in str(info.value)


def test_decode_attention_non_power_of_two_block_fails_at_lowering():
    with pytest.raises(ValueError, match=POWER_OF_TWO_ERROR):
        lower_for_cuda(
            lambda *a: decode_attention(*a, block_k=96, interpret=False),
            *decode_shapes(1, 5000, 32, 8, 128, jnp.bfloat16),
        )


MOSAIC_CALL = "stablehlo.custom_call @mosaic_gpu_v2("


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@HEAD_DIMS
@HEADS
@pytest.mark.parametrize("t", [1000, 4097])
@pytest.mark.parametrize("block_k, slots, window", [(64, 2, None), (128, 3, None), (64, 2, 256)])
def test_mgpu_flash_attention_lowers_to_one_mosaic_call(
    dtype, d, hq, hkv, t, block_k, slots, window
):
    if d == 256 and (block_k, slots) == (128, 3):  # 425 KB of K/V buffers: a clear error
        with pytest.raises(CpjaxError, match="shared memory"):
            jax.eval_shape(
                functools.partial(flash_attention_mgpu, block_k=block_k, slots=slots),
                *flash_shapes(t, hq, hkv, d, dtype),
            )
        return
    text = lower_for_cuda(
        lambda *a: flash_attention_mgpu(
            *a, block_k=block_k, slots=slots, window=window, interpret=False
        ),
        *flash_shapes(t, hq, hkv, d, dtype),
    )
    assert text.count(MOSAIC_CALL) == 1 and TRITON_CALL not in text


@pytest.mark.parametrize("t", [4096, 131072])
def test_benchmark_mgpu_prefill_shapes_lower(t):
    """``experiments/bench_kernels.py --platform gpu``: bf16, 32/8 heads, D 128."""
    text = lower_for_cuda(
        lambda *a: flash_attention_mgpu(*a, interpret=False)[0],
        *flash_shapes(t, 32, 8, 128, jnp.bfloat16),
    )
    assert text.count(MOSAIC_CALL) == 1


@pytest.mark.parametrize("preset", ["smollm2-135m", "llama3-8b"])
def test_model_forward_with_pallas_mgpu_attention_lowers(monkeypatch, preset):
    """One bf16 layer, ``attention="pallas_mgpu"``: a 1000-token prefill is one Mosaic GPU call."""
    from cpjax.attention import with_past
    from cpjax.config import PRESETS
    from cpjax.dispatch import pallas_mgpu_attend
    from cpjax.model.decoder import Decoder, param_shapes

    monkeypatch.setattr(
        pallas_kernels,
        "flash_attention_mgpu",
        functools.partial(flash_attention_mgpu, interpret=False),
    )
    cfg = dataclasses.replace(PRESETS[preset], n_layers=1)
    model = Decoder(cfg, with_past(pallas_mgpu_attend), jnp.bfloat16)
    rows = S((1000,), I32)
    text = lower_for_cuda(
        lambda params, *r: model.apply({"params": params}, *r),
        param_shapes(cfg, jnp.bfloat16),
        rows,
        rows,
        rows,
    )
    assert text.count(MOSAIC_CALL) == 1
