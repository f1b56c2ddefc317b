"""Device mesh and the one table of logical-axis rules that maps params and activations onto it.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with params/optimizer state sharded
over it), `tensor` (heads/MLP/vocab split across devices). Parameter logical axes come from the
modules (`embed`, `heads`, `mlp`, `vocab`, `layers`, ...), activation axes are prefixed `act_`.
A dimension that a mesh axis does not divide stays replicated (e.g. the 65037-token vocab).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kosmos2_jax.utils.errors import UsageError

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("embed_out", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("positions", None),
    ("queries", None),
)


def rules_from_text(text: str, base: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> tuple[tuple[str, Any], ...]:
    """`base` with the overrides of a config's `mesh.rules`: "logical=axis" items joined by commas,
    the axis a mesh axis, several joined by "+" ("act_batch=data+fsdp"), or "none" (replicated)."""
    table = dict(base)
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        logical, eq, axes = (x.strip() for x in item.partition("="))
        if not eq or logical not in table:
            raise UsageError(f"{item!r}: give LOGICAL=MESH_AXIS with LOGICAL one of {', '.join(sorted(table))}")
        names = tuple(a.strip() for a in axes.split("+"))
        if names == ("none",):
            table[logical] = None
            continue
        bad = [a for a in names if a not in MESH_AXES]
        if bad:
            raise UsageError(f"{item!r}: {bad[0]!r} is not a mesh axis ({', '.join(MESH_AXES)}, or none)")
        table[logical] = names[0] if len(names) == 1 else names
    return tuple(table.items())


def create_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 (= the remaining devices). `dcn_data` in a
    mapping (default 1): the data axis also spans that many slices joined by the data-center network
    (TPU slices by `slice_index`, elsewhere processes), data-parallel across them, so that fsdp's
    gathers and tensor's collectives stay inside a slice (MaxText's `dcn_data_parallelism`)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [shape[a] for a in MESH_AXES] if isinstance(shape, Mapping) else list(shape)
    dcn = int(shape.get("dcn_data", 1)) if isinstance(shape, Mapping) else 1
    if len(sizes) != len(MESH_AXES) or sizes.count(-1) > 1:
        raise UsageError(f"mesh shape {shape} must give {MESH_AXES} with at most one -1")
    if dcn < 1 or len(devices) % dcn:
        raise UsageError(f"mesh.dcn_data={dcn}: must be >= 1 and divide the {len(devices)} devices")
    per_slice = len(devices) // dcn
    known = math.prod(s for s in sizes if s != -1)
    sizes = [per_slice // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != per_slice:
        where = f" of each of the {dcn} slices" if dcn > 1 else ""
        raise UsageError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {per_slice}{where}")
    if dcn == 1:
        return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)
    from jax.experimental import mesh_utils

    by_slice = devices[0].platform == "tpu" and hasattr(devices[0], "slice_index")
    granules = len({d.slice_index if by_slice else d.process_index for d in devices})
    if granules != dcn:
        raise UsageError(f"mesh.dcn_data={dcn}: these {len(devices)} devices form {granules} "
                         f"{'slices' if by_slice else 'processes'}; give their count (or 1)")
    grid = mesh_utils.create_hybrid_device_mesh(tuple(sizes), (dcn, 1, 1), devices, process_is_granule=not by_slice)
    return Mesh(grid, MESH_AXES)


def mesh_from_text(text: str, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh from "AXIS=SIZE" items joined by commas ("tensor=4", "fsdp=2,tensor=2"; -1 = the
    remaining devices); an axis not named has size 1."""
    return create_mesh(mesh_shape_from_text(text), devices)


def mesh_shape_from_text(text: str) -> dict[str, int]:
    """`mesh_from_text`'s sizes, checked: {"data": 1, "fsdp": 2, "tensor": 2}."""
    shape = dict.fromkeys(MESH_AXES, 1)
    for item in filter(None, (p.strip() for p in text.split(","))):
        axis, eq, size = (x.strip() for x in item.partition("="))
        if not eq or axis not in shape or not size.lstrip("-").isdigit() or int(size) == 0 or int(size) < -1:
            raise UsageError(f"mesh {text!r}: give AXIS=SIZE items with AXIS one of {', '.join(MESH_AXES)} and "
                             f"SIZE a positive integer or -1, e.g. tensor=4 or fsdp=2,tensor=2")
        shape[axis] = int(size)
    return shape


def local_mesh(text: str) -> Mesh | None:
    """A command's `--mesh` (`mesh_from_text`) over this process's devices; None for ""."""
    return mesh_from_text(text, jax.local_devices()) if text else None


def _mesh_axes_for(logical: str | None, rules: Mapping[str, Any]):
    if logical is None:
        return None
    if logical not in rules:
        raise ValueError(f"logical axis {logical!r} has no sharding rule; known: {sorted(rules)}")
    return rules[logical]


def spec_for(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
             rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> PartitionSpec:
    """Logical axes -> PartitionSpec, keeping a dimension replicated when its mesh axes don't
    divide it and never using one mesh axis twice."""
    table, used, out = dict(rules), set(), []
    for dim, logical in zip(shape, logical_axes):
        axes = _mesh_axes_for(logical, table)
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (e.g. `jax.eval_shape(model.init)`),
    for the unboxed tree. Leaves without axis names are replicated."""
    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            value = leaf.value
            if isinstance(value, optax.MaskedNode):  # a partitioned optimizer's placeholder: no array
                return value
            return NamedSharding(mesh, spec_for(value.shape, leaf.names, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def logical_params(model) -> dict:
    """Shapes/dtypes of `model`'s params with each leaf's logical axis names (`nn.LogicallyPartitioned`
    leaves, for `tree_shardings`), without allocating them (traced once per model)."""
    return jax.tree_util.tree_map(lambda s: s, _logical_params(model),
                                  is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@functools.lru_cache(maxsize=8)  # tracing the released model's init takes a second or more
def _logical_params(model) -> dict:
    c = model.config
    pix = jax.ShapeDtypeStruct((1, c.vision.image_size, c.vision.image_size, c.vision.num_channels), np.float32)
    ids = jax.ShapeDtypeStruct((1, c.latent_query_num + 2), np.int32)
    return jax.eval_shape(lambda p, i: model.init(jax.random.PRNGKey(0), p, i, None, i), pix, ids)["params"]


def logical_axis_rules(rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """Context manager for activation constraints: `with mesh, logical_axis_rules(): ...`."""
    return nn.logical_axis_rules(list(rules))
