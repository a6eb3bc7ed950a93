"""Model checkpoints: a converted model (config, params pytree, tokenizer) saved once with orbax
and restored onto any mesh.

Layout of a checkpoint directory::

    params/                 the params pytree, written by orbax (``StandardCheckpointer``),
                            every leaf in the dtype it was saved in
    tokenizer.json          the tokenizer's ``to_dict()`` (absent when saved without one)
    cpjax_checkpoint.json   the marker, written last: format, version, the ModelConfig and the
                            manifest ``{leaf path: {shape, dtype}}``

Atomic replacement. A save refuses a PATH that is not absent, an empty folder or a complete
checkpoint; it writes everything into the sibling ``.NAME.cpjax-partial``, fsyncs it, and only
then swaps it in::

    1. recover: if PATH is absent and .NAME.cpjax-previous is complete, rename it to PATH;
       then delete a stale .NAME.cpjax-previous and .NAME.cpjax-partial
    2. write .NAME.cpjax-partial (params, tokenizer; fsync all files and folders; the marker
       last, fsynced)
    3. rename PATH -> .NAME.cpjax-previous       (if PATH exists)
    4. rename .NAME.cpjax-partial -> PATH; fsync the parent folder
    5. delete .NAME.cpjax-previous (its marker first, so a half-deleted one is never complete)

A folder is complete iff it holds the marker, and a marker only reaches PATH by the rename of
a folder whose files were all fsynced before it was written. Invariant: once a save starts over
a complete checkpoint, at every instant PATH is a complete checkpoint, the old one or the new
one, except between steps 3 and 4, when PATH is absent and .NAME.cpjax-previous is the complete
old one. So :func:`load_checkpoint` reads PATH if complete, or, when PATH is absent, the
complete backup (read-only: the next save renames it back, step 1), and a save killed before
step 4 leaves the previous checkpoint loadable, bit for bit (after it, the new one). The scheme
guards against crashes, not concurrency: one writer per PATH, and no loads of PATH during a save.

Test hook: with ``CPJAX_CHECKPOINT_PAUSE_AT=staged`` (after step 2) or ``=swapping`` (between
steps 3 and 4), a save prints ``cpjax-checkpoint paused at STAGE`` to stderr and sleeps until
killed, so tests can SIGKILL it at exactly that point.

With several jax processes (multi-host, a shared file system) every process calls
:func:`save_checkpoint`; orbax writes each process's shards, and process 0 alone does the file
operations above, between barriers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding

from cpjax.config import ModelConfig, config_from_dict, config_to_dict
from cpjax.errors import CpjaxError, require
from cpjax.loaders.byte_tokenizer import ByteTokenizer
from cpjax.loaders.tokenizer import Tokenizer
from cpjax.model.decoder import (
    check_param_shapes,
    leaf_name,
    leaves_by_name,
    param_axes,
    param_shapes,
)
from cpjax.parallel.distributed import is_main_process
from cpjax.parallel.sharding import tree_specs

FORMAT = "cpjax-checkpoint"
VERSION = 1
MARKER = "cpjax_checkpoint.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.json"
PAUSE_ENV = "CPJAX_CHECKPOINT_PAUSE_AT"


# ----------------------------------------------------------------------------- paths
def _sibling(path: str, suffix: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{suffix}")


def staging_path(path: str) -> str:
    """Where a save of ``path`` writes before the swap (``.NAME.cpjax-partial``)."""
    return _sibling(path, "cpjax-partial")


def backup_path(path: str) -> str:
    """Where the previous checkpoint waits during the swap (``.NAME.cpjax-previous``)."""
    return _sibling(path, "cpjax-previous")


def is_complete(directory: str) -> bool:
    """Whether ``directory`` holds the marker, i.e. is a complete checkpoint."""
    return os.path.isfile(os.path.join(directory, MARKER))


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` names a cpjax checkpoint, complete or not: it has the marker or a
    ``params`` folder, or it is absent and its backup is complete (a save died mid-swap)."""
    return (
        is_complete(path)
        or os.path.isdir(os.path.join(path, PARAMS_DIR))
        or (not os.path.exists(path) and is_complete(backup_path(path)))
    )


def _readable(path: str) -> str:
    """The complete checkpoint directory that stands for ``path`` (see the invariant)."""
    if is_complete(path):
        return path
    if not os.path.exists(path):
        require(is_complete(backup_path(path)), f"checkpoint {path!r} does not exist")
        return backup_path(path)
    raise CpjaxError(
        f"checkpoint {path!r} is incomplete or not a cpjax checkpoint: it has no "
        f"{MARKER} (written last by save_checkpoint); convert the model again"
    )


# ----------------------------------------------------------------------------- file system
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: str) -> None:
    """fsync every file and folder under ``directory``, children before parents."""
    for root, _, files in os.walk(directory, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CpjaxError(f"checkpoint {what} {path!r} is unreadable or corrupt ({exc})") from None


def _remove(directory: str) -> None:
    """Delete a checkpoint folder if it exists, its marker first (so a half-deleted one is
    never complete)."""
    if os.path.exists(os.path.join(directory, MARKER)):
        os.remove(os.path.join(directory, MARKER))
    if os.path.exists(directory):
        shutil.rmtree(directory)


def _rename(src: str, dst: str) -> None:
    os.rename(src, dst)
    _fsync(os.path.dirname(dst))


def _pause_point(stage: str) -> None:
    """Test hook: sleep until killed when ``$CPJAX_CHECKPOINT_PAUSE_AT == stage``."""
    if os.environ.get(PAUSE_ENV) == stage:
        print(f"cpjax-checkpoint paused at {stage}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


def _sync(tag: str) -> None:
    """Barrier across jax processes (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"cpjax-checkpoint-{tag}")


# ----------------------------------------------------------------------------- params manifest
def manifest(params) -> dict:
    """``{leaf path: {"shape": [...], "dtype": name}}`` of a params pytree."""
    return {
        name: {"shape": list(np.shape(x)), "dtype": jnp.dtype(x.dtype).name}
        for name, x in leaves_by_name(params).items()
    }


def check_manifest(config: ModelConfig, entries: dict, what: str) -> None:
    """Raise a :class:`CpjaxError` unless ``entries`` (a :func:`manifest`) has exactly the
    leaves and shapes that ``config`` implies."""
    check_param_shapes(config, {name: e["shape"] for name, e in entries.items()}, what)


def abstract_params(config: ModelConfig, entries: dict, what: str):
    """The params pytree as ``ShapeDtypeStruct``s: shapes from ``config`` (checked against the
    manifest ``entries``), each leaf's dtype from ``entries``."""
    check_manifest(config, entries, what)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(entries[leaf_name(path)]["dtype"])),
        param_shapes(config),
    )


def config_differences(expected: ModelConfig, actual: ModelConfig) -> list[str]:
    """``"field=actual (expected ...)"`` for each field that differs; ``name`` (a label, not a
    property of the weights) is ignored."""
    want, got = config_to_dict(expected), config_to_dict(actual)
    return [
        f"{k}={got[k]!r} (expected {want[k]!r})" for k in want if k != "name" and want[k] != got[k]
    ]


# ----------------------------------------------------------------------------- shardings
def _check_divisible(name: str, shape: tuple, sharding) -> None:
    """A :class:`CpjaxError` unless each dimension that ``sharding`` splits over mesh axes is a
    multiple of their sizes (a non-``NamedSharding`` passes)."""
    if not isinstance(sharding, NamedSharding):
        return
    for dim, (size, axes) in enumerate(zip(shape, sharding.spec)):
        for axis in () if axes is None else (axes if isinstance(axes, tuple) else (axes,)):
            n = sharding.mesh.shape[axis]
            require(
                size % n == 0,
                f"cannot shard parameter {name} of shape {tuple(shape)} over mesh axis "
                f"{axis!r} of size {n}: its dimension {dim} ({size}) is not a multiple "
                f"of {n}",
            )


def mesh_shardings(config: ModelConfig, mesh, abstract):
    """``NamedSharding``s on ``mesh`` for the leaves of ``abstract`` (``ShapeDtypeStruct``s),
    from the model's logical axes (``param_axes(config)``) and
    ``cpjax.parallel.sharding.RULES``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(param_axes(config), abstract))


def _restore_targets(config: ModelConfig, abstract, mesh, shardings):
    """``abstract`` with a sharding on each leaf: ``shardings``, the mesh's, or the first
    local device; each checked to divide the dimensions it splits."""
    require(
        mesh is None or shardings is None, "load_checkpoint: pass mesh= or shardings=, not both"
    )
    if shardings is None:
        first = SingleDeviceSharding(jax.local_devices()[0])
        shardings = (
            mesh_shardings(config, mesh, abstract)
            if mesh is not None
            else jax.tree.map(lambda _: first, abstract)
        )
    require(
        jax.tree.structure(shardings) == jax.tree.structure(abstract),
        f"load_checkpoint: shardings= must have the structure of the params "
        f"({jax.tree.structure(abstract)}), got {jax.tree.structure(shardings)}",
    )
    by_name = leaves_by_name(shardings)
    for name, x in leaves_by_name(abstract).items():
        _check_divisible(name, x.shape, by_name[name])
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


# ----------------------------------------------------------------------------- save / load
def _check_replaceable(path: str) -> None:
    """A :class:`CpjaxError` unless ``path`` is absent, an empty folder or a complete
    checkpoint: a save never replaces anything else."""
    require(
        not os.path.exists(path)
        or is_complete(path)
        or (os.path.isdir(path) and not os.listdir(path)),
        f"checkpoint path {path!r} exists and is not a complete cpjax checkpoint (no "
        f"{MARKER}); refusing to replace it: remove it or choose another path",
    )


def _prepare(path: str) -> None:
    """Step 1: put the complete backup back at ``path`` if a save died mid-swap, then delete
    stale staging and backup folders."""
    backup = backup_path(path)
    if not os.path.exists(path) and is_complete(backup):
        _rename(backup, path)
    for stale in (backup, staging_path(path)):
        _remove(stale)


def save_checkpoint(path, config: ModelConfig, params, tokenizer=None) -> None:
    """Save ``(config, params, tokenizer)`` at ``path`` atomically (module docstring).

    ``params`` is the model's pytree (numpy or jax arrays; shapes from ``config``, any dtype:
    each leaf keeps its own). ``tokenizer`` is a ``Tokenizer``, a ``ByteTokenizer`` or None.
    An existing checkpoint at ``path`` is replaced; anything else there is refused.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    require(
        isinstance(config, ModelConfig),
        f"save_checkpoint: config must be a ModelConfig, got {type(config).__name__}",
    )
    entries = manifest(params)
    check_manifest(config, entries, "params")
    _check_replaceable(path)
    staging = staging_path(path)
    if is_main_process():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _prepare(path)
        os.makedirs(staging)
    _sync("prepared")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(staging, PARAMS_DIR), params)
    _sync("params-written")
    if is_main_process():
        if tokenizer is not None:
            _write_json(os.path.join(staging, TOKENIZER_FILE), tokenizer.to_dict())
        _fsync_tree(staging)
        _write_json(
            os.path.join(staging, MARKER),
            {
                "format": FORMAT,
                "version": VERSION,
                "config": config_to_dict(config),
                "tokenizer": tokenizer is not None,
                "params": entries,
            },
        )
        _fsync(staging)
        _pause_point("staged")
        if os.path.exists(path):
            _rename(path, backup_path(path))
            _pause_point("swapping")
        _rename(staging, path)
        _remove(backup_path(path))
    _sync("swapped")


def _read_marker(directory: str) -> dict:
    meta = _read_json(os.path.join(directory, MARKER), "marker")
    require(
        isinstance(meta, dict) and meta.get("format") == FORMAT,
        f"{os.path.join(directory, MARKER)!r}: not a cpjax checkpoint marker",
    )
    require(
        meta.get("version") == VERSION,
        f"checkpoint {directory!r} has format version {meta.get('version')!r}; this cpjax "
        f"reads version {VERSION}: convert the model again",
    )
    missing = [key for key in ("config", "tokenizer", "params") if key not in meta]
    require(
        not missing,
        f"checkpoint marker {os.path.join(directory, MARKER)!r} lacks "
        f"{', '.join(missing)}: convert the model again",
    )
    return meta


def _read_tokenizer(directory: str, meta: dict):
    if not meta["tokenizer"]:
        return None
    data = _read_json(os.path.join(directory, TOKENIZER_FILE), "tokenizer")
    kinds = {"tokenizers": Tokenizer, "bytes": ByteTokenizer}
    require(
        isinstance(data, dict) and data.get("kind") in kinds,
        f"checkpoint tokenizer in {directory!r}: unknown kind "
        f"{data.get('kind') if isinstance(data, dict) else data!r}",
    )
    return kinds[data["kind"]].from_dict(data)


def load_checkpoint(path, mesh=None, shardings=None, expected_config: ModelConfig = None):
    """Restore a checkpoint: returns ``(config, params, tokenizer)``.

    Each leaf is read straight into its place, in its saved dtype: on ``mesh`` with the model's
    ``NamedSharding`` (so a checkpoint saved anywhere reshards onto any mesh whose tensor axis
    divides the heads and FFN), on the given ``shardings`` (a pytree like the params), or, with
    neither, on the first device. With ``expected_config``, a checkpoint of any other config
    (``name`` aside) is a :class:`CpjaxError` naming each differing field. ``tokenizer`` is
    None when the checkpoint was saved without one.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    directory = _readable(path)
    meta = _read_marker(directory)
    config = config_from_dict(meta["config"])
    if expected_config is not None:
        differences = config_differences(expected_config, config)
        require(
            not differences,
            f"checkpoint {path!r} is for another model config than the expected "
            f"{expected_config.name!r}: {'; '.join(differences)}",
        )
    abstract = abstract_params(config, meta["params"], f"checkpoint {path!r}: params")
    targets = _restore_targets(config, abstract, mesh, shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(os.path.join(directory, PARAMS_DIR), targets)
    except (OSError, ValueError) as exc:
        raise CpjaxError(
            f"checkpoint {path!r}: the params are unreadable or corrupt "
            f"({str(exc)[:300]}); convert the model again"
        ) from exc
    return config, params, _read_tokenizer(directory, meta)
