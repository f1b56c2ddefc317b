"""TPU slices described without a TPU (libtpu's topology descriptions), for the compile-only
checks of training (`train/compile_check.py`) and serving (`inference/serving_check.py`)."""

from __future__ import annotations

import math
import os
import re

from kosmos2_jax.utils.errors import UsageError

# HBM per chip, GiB (Cloud TPU system architecture pages)
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_SHAPES = {3: ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16"],
           2: ["1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"]}


def _describe(generation: str, shape: str, num_slices: int = 1):
    import importlib.util

    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise UsageError("the compile-only check needs libtpu to describe TPU slices: pip install libtpu==0.0.42.1 "
                         "(the version for jax 0.10.2; no TPU needed)")
    # Describing a slice needs no TPU: don't contend for libtpu's lock with a job that uses the chips.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    dims = [int(d) for d in shape.split("x")]
    # a slice smaller than a host's 2x2 chips (v5e-1, a single-chip VM) is one host of its own shape
    host = dict(chips_per_host_bounds=tuple(dims + [1] * (3 - len(dims)))) if math.prod(dims) < 4 else {}
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=f"{generation}:{shape}",
                                            num_slices=num_slices, **host).devices
    except Exception as e:  # a shape libtpu does not know
        raise UsageError(f"libtpu cannot describe TPU topology {generation}:{shape}: "
                         f"{(str(e).splitlines() or [''])[0][:200]}") from None


def topology_devices(name: str, num_slices: int = 1) -> tuple[list, str, float]:
    """`v5p:4x4x8` (libtpu's name) or `v5p-128` (the slice with 128 JAX devices) -> (devices,
    libtpu's name, HBM GiB per device); `num_slices` such slices joined by the data-center network
    (their devices' `slice_index` tells them apart). v4's description has two devices (cores) per chip."""
    if num_slices < 1:
        raise UsageError(f"--num_slices {num_slices}: must be >= 1")
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)([:-])([0-9x]+)", name)
    if not m:
        raise UsageError(f"--topology {name!r}: expected e.g. v5p-128 or v5p:4x4x8 (generations {sorted(HBM_GIB)})")
    generation, sep, rest = m.groups()
    if sep == ":":
        shape = rest
        devices = _describe(generation, shape, num_slices)
    else:
        wanted, devices = int(rest), None
        for shape in _SHAPES[2 if generation in ("v5e", "v6e") else 3]:
            try:
                found = _describe(generation, shape)
            except ValueError:
                continue
            if len(found) == wanted:
                devices = _describe(generation, shape, num_slices) if num_slices > 1 else found
                break
        if devices is None:
            raise UsageError(f"--topology {name!r}: no {generation} slice of {wanted} devices among "
                             f"{_SHAPES[2 if generation in ('v5e', 'v6e') else 3]}; give libtpu's name, e.g. {generation}:4x4x8")
    described = f"{generation}:{shape}" + (f" x {num_slices} slices" if num_slices > 1 else "")
    return list(devices), described, HBM_GIB[generation] * chip_count(devices) / len(devices)


def chip_count(devices) -> int:
    """Chips among TPU `devices` (v4's description has two devices a chip), over all their slices."""
    if not hasattr(devices[0], "coords"):
        return len(devices)
    return len({(getattr(d, "slice_index", 0), *d.coords) for d in devices})
