"""Device mesh and the one table of logical-axis rules that maps params and activations onto it.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with params/optimizer state sharded
over it), `tensor` (heads/MLP/vocab split across devices). Parameter logical axes come from the
modules (`embed`, `heads`, `mlp`, `vocab`, `layers`, ...), activation axes are prefixed `act_`.
A dimension that a mesh axis does not divide stays replicated (e.g. the 65037-token vocab).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kosmos2_jax.models import partitioning
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
    """A (data, fsdp, tensor) mesh; one size may be -1 (= the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [shape[a] for a in MESH_AXES] if isinstance(shape, Mapping) else list(shape)
    if len(sizes) != len(MESH_AXES) or sizes.count(-1) > 1:
        raise UsageError(f"mesh shape {shape} must give {MESH_AXES} with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise UsageError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def spec_for(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
             rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> PartitionSpec:
    """`models.partitioning.spec_for` under this table of rules by default."""
    return partitioning.spec_for(shape, logical_axes, mesh, rules)


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


def logical_axis_rules(rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """Context manager for activation constraints: `with mesh, logical_axis_rules(): ...`."""
    return nn.logical_axis_rules(list(rules))
