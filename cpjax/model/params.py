"""Parameter tables: each parameter of a model family described once.

A model family lists its parameters as a tuple of :class:`Param` entries (its *table*). Every
other description of the parameters derives from that table: random init, shapes, logical axes
(hence shardings, via ``cpjax.parallel.sharding.RULES``), the per-device shard shapes inside
``shard_map``, the parameter count, the shape check, and the conversion to and from checkpoint
tensors (HF safetensors names, GGUF names, transposes and reshapes).

Parameters form a nested-dict pytree named by ``/``-joined paths (``"layers/wq"`` is
``params["layers"]["wq"]``). Entries whose first logical axis is ``"layers"`` are *stacked*:
one slice per transformer block, ``shape[0] == n_layers``, and their checkpoint names hold a
``{layer}`` placeholder (one checkpoint tensor per layer).

Checkpoint layout. HF stores a linear layer as ``[out, in]``; cpjax stores it as ``[in, out]``
with the in/out features split into their logical axes (``wq [D, Hq, Dh]`` is HF's
``q_proj [Hq*Dh, D]``). ``hf_in_axes = k > 0`` says exactly that: the first ``k`` axes of one
layer's slice are HF's in-features, the rest its out-features; ``k = 0`` means the same layout
as HF (embedding, norms).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cpjax.config import ModelConfig
from cpjax.errors import require

Shape = tuple[int, ...]
#: ``init(key, shape, dtype) -> array`` (a ``jax.nn.initializers`` initialiser).
Initializer = Callable[[jax.Array, Shape, jnp.dtype], jax.Array]
LAYER_AXIS = "layers"


def _always(config: ModelConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a model family.

    Attributes:
      name: leaf path in the params pytree (``"layers/wq"``).
      shape: ``config -> shape`` of the whole (global, stacked) array.
      axes: logical axis names of ``shape``'s dimensions (``("layers", "embed", ...)``).
      init: initialiser of the whole array.
      hf: HF safetensors tensor name (``{layer}`` in it for a stacked entry).
      gguf: llama.cpp GGUF tensor name (``{layer}`` likewise).
      hf_in_axes: how many leading axes of one layer's slice are HF's in-features (0: the
        array is stored as in HF; see the module docstring).
      hf_flat: the HF tensor is the slice flattened to one axis (a projection's bias).
      from_gguf: ``(tensor [out, in], config) -> tensor`` in HF order and values, for a GGUF
        tensor that llama.cpp reorders or shifts (None: the GGUF tensor is the HF tensor).
      present: ``config -> bool``; False drops the parameter (an untied output head).
    """

    name: str
    shape: Callable[[ModelConfig], Shape]
    axes: tuple[str, ...]
    init: Initializer
    hf: str
    gguf: str
    hf_in_axes: int = 0
    hf_flat: bool = False
    from_gguf: Optional[Callable[[np.ndarray, ModelConfig], np.ndarray]] = None
    present: Callable[[ModelConfig], bool] = _always

    @property
    def stacked(self) -> bool:
        """One slice per transformer block along axis 0."""
        return self.axes[0] == LAYER_AXIS

    @property
    def key(self) -> str:
        """The entry's name inside its parent dict (``"wq"`` for ``"layers/wq"``)."""
        return self.name.rsplit("/", 1)[-1]


Table = tuple[Param, ...]


def entries(table: Table, config: ModelConfig) -> Table:
    """The entries of ``table`` that ``config`` has (in table order)."""
    return tuple(p for p in table if p.present(config))


def by_name(table: Table) -> dict[str, Param]:
    """``{entry name: entry}``."""
    return {p.name: p for p in table}


def _nest(items) -> dict:
    """``{"a/b": x}`` pairs -> ``{"a": {"b": x}}``."""
    tree: dict = {}
    for name, value in items:
        *parents, key = name.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    return tree


def shape_tree(table: Table, config: ModelConfig, dtype=jnp.float32) -> dict:
    """The params pytree as ``jax.ShapeDtypeStruct`` leaves (no allocation)."""
    return _nest(
        (p.name, jax.ShapeDtypeStruct(p.shape(config), jnp.dtype(dtype)))
        for p in entries(table, config)
    )


def axes_tree(table: Table, config: ModelConfig) -> dict:
    """The params pytree with each leaf's logical axes (for ``sharding.tree_specs``)."""
    return _nest((p.name, p.axes) for p in entries(table, config))


def init_tree(table: Table, config: ModelConfig, key: jax.Array, dtype) -> dict:
    """Random params: each entry's ``init`` on its whole shape, one key per entry."""
    present = entries(table, config)
    keys = jax.random.split(key, len(present))
    return _nest(
        (p.name, p.init(k, p.shape(config), jnp.dtype(dtype))) for p, k in zip(present, keys)
    )


def leaf_name(path) -> str:
    """``"layers/wq"`` for the pytree path of ``params["layers"]["wq"]``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def leaves_by_name(tree) -> dict:
    """``{"layers/wq": leaf, ...}``: the leaves of a nested-dict pytree by name."""
    return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def count(table: Table, config: ModelConfig) -> int:
    """Number of parameters (elements of all present entries)."""
    return sum(math.prod(p.shape(config)) for p in entries(table, config))


def check_shapes(table: Table, config: ModelConfig, shapes: dict, what: str) -> None:
    """Raise a :class:`CpjaxError` unless ``shapes`` (``{leaf name: shape}``) has exactly the
    entries and shapes that ``config`` implies, naming (up to three of) the mismatches."""
    expected = {
        name: tuple(x.shape) for name, x in leaves_by_name(shape_tree(table, config)).items()
    }
    got = {name: tuple(shape) for name, shape in shapes.items()}
    problems = (
        [f"{n} is missing" for n in expected if n not in got]
        + [f"{n} is not a parameter of this model" for n in got if n not in expected]
        + [
            f"{n} has shape {got[n]}, the config needs {s}"
            for n, s in expected.items()
            if n in got and got[n] != s
        ]
    )
    shown = "; ".join(problems[:3]) + (
        f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    )
    require(not problems, f"{what} do not match model config {config.name!r}: {shown}")


# ------------------------------------------------------------------------- checkpoints
def slice_shape(param: Param, config: ModelConfig) -> Shape:
    """Shape of one checkpoint tensor's worth of ``param`` (one layer's slice if stacked)."""
    shape = param.shape(config)
    return shape[1:] if param.stacked else shape


def hf_shape(param: Param, config: ModelConfig) -> Shape:
    """Shape of the HF tensor of ``param`` (one layer's, if stacked): ``[out, in]`` when
    ``hf_in_axes > 0``, else the slice shape."""
    shape = slice_shape(param, config)
    if param.hf_flat:
        return (math.prod(shape),)
    k = param.hf_in_axes
    return (math.prod(shape[k:]), math.prod(shape[:k])) if k else shape


def checkpoint_names(param: Param, config: ModelConfig, fmt: str) -> list[str]:
    """The tensor names of ``param`` in format ``fmt`` (``"hf"`` or ``"gguf"``): one per layer
    if stacked, in layer order."""
    template = getattr(param, fmt)
    return (
        [template.format(layer=i) for i in range(config.n_layers)] if param.stacked else [template]
    )


def tensor_names(table: Table, config: ModelConfig, fmt: str) -> list[str]:
    """Every tensor name of ``config``'s checkpoint in format ``fmt``, in table order."""
    return [n for p in entries(table, config) for n in checkpoint_names(p, config, fmt)]


def from_hf(param: Param, config: ModelConfig, tensor: np.ndarray, dtype) -> np.ndarray:
    """One HF-layout tensor of ``param`` (shape :func:`hf_shape`) in cpjax layout (one layer's
    slice if stacked): ``[out, in]`` transposed to ``[in, out]``, reshaped, cast to ``dtype``."""
    if param.hf_in_axes:
        tensor = tensor.T
    return tensor.reshape(slice_shape(param, config)).astype(dtype, copy=False)


def to_hf(param: Param, config: ModelConfig, array) -> np.ndarray:
    """The inverse of :func:`from_hf`, as a contiguous float32 array of :func:`hf_shape`."""
    shape = hf_shape(param, config)
    array = np.asarray(array, np.float32)
    if param.hf_in_axes:
        array = array.reshape(shape[::-1]).T
    return np.ascontiguousarray(array.reshape(shape))


#: ``read(param, name, shape) -> tensor``: checkpoint tensor ``name`` of ``param``, in HF
#: layout, of exactly ``shape`` (:func:`hf_shape`).
TensorReader = Callable[[Param, str, Shape], np.ndarray]


def params_from_checkpoint(
    table: Table, config: ModelConfig, read: TensorReader, fmt: str, dtype=np.float32
) -> dict:
    """The params pytree (numpy, ``dtype``) from the tensors ``read`` gives for the names of
    format ``fmt``; each stacked array is allocated once and filled layer by layer."""
    leaves = []
    for p in entries(table, config):
        names = checkpoint_names(p, config, fmt)
        if not p.stacked:
            leaves.append(
                (p.name, from_hf(p, config, read(p, names[0], hf_shape(p, config)), dtype))
            )
            continue
        array = np.empty(p.shape(config), dtype)
        for i, name in enumerate(names):
            array[i] = from_hf(p, config, read(p, name, hf_shape(p, config)), dtype)
        leaves.append((p.name, array))
    return _nest(leaves)


def params_to_hf(table: Table, config: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """HF name -> float32 HF-layout tensor for every tensor of ``params`` (numpy or jax
    arrays); the inverse of :func:`params_from_checkpoint` with ``fmt="hf"``."""
    tensors = {}
    for p in entries(table, config):
        array = params
        for key in p.name.split("/"):
            array = array[key]
        slices = array if p.stacked else [array]
        for name, piece in zip(checkpoint_names(p, config, "hf"), slices):
            tensors[name] = to_hf(p, config, piece)
    return tensors
