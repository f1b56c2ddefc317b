"""Logical axis names -> a PartitionSpec on a mesh; the one rule `train.sharding` (params,
shardings of the train state) and the model's own shard_maps (splash attention) both follow."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from jax.sharding import Mesh, PartitionSpec


def _mesh_axes_for(logical: str | None, rules: Mapping[str, Any]):
    if logical is None:
        return None
    if logical not in rules:
        raise ValueError(f"logical axis {logical!r} has no sharding rule; known: {sorted(rules)}")
    return rules[logical]


def spec_for(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
             rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
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
