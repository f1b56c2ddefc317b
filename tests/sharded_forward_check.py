"""Run as a script with 8 fake CPU devices (see test_sharding.py): the (data=2, fsdp=2, tensor=2)
sharded forward equals the single-device one, and every param gets a sharding from the rules."""

import os
import sys

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import flax.linen as nn  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from kosmos2_jax.models import Kosmos2, tiny  # noqa: E402
from kosmos2_jax.models import sharding  # noqa: E402


def main():
    assert len(jax.devices()) == 8, jax.devices()
    scan = sys.argv[1] == "scan"
    model = Kosmos2(tiny(vocab_size=128, scan_layers=scan))
    q = model.config.latent_query_num
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.tile([[0, 5]], (4, 1)), np.tile(np.arange(4, 4 + q), (4, 1)), np.full((4, 1), 6),
                          rng.integers(7, 128, (4, 9))], axis=1).astype(np.int32)
    ids[1, -3:] = 1
    mask = (ids != 1).astype(np.int32)
    img = np.zeros_like(ids)
    img[:, 2:2 + q] = 1
    pixels = rng.standard_normal((4, 28, 28, 3)).astype(np.float32)

    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), pixels, ids, mask, img))["params"]
    params = nn.unbox(model.init(jax.random.PRNGKey(0), pixels, ids, mask, img)["params"])
    ref = np.asarray(jax.jit(model.apply)({"params": params}, pixels, ids, mask, img))

    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.tree_shardings(boxed, mesh)
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves), "a param has no logical axis names"
    specs = [s.spec for s in jax.tree_util.tree_leaves(shardings)]
    assert sum(any(a is not None for a in s) for s in specs) >= len(specs) // 2, specs
    params = jax.device_put(params, shardings)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh), sharding.logical_axis_rules():
        fn = jax.jit(model.apply, in_shardings=({"params": shardings}, batch, batch, batch, batch))
        out = fn({"params": params}, *(jax.device_put(x, batch) for x in (pixels, ids, mask, img)))
    kernel = params["text_model"]["embed_tokens"]["embedding"]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    err = float(np.abs(np.asarray(out) - ref).max())
    assert err <= 1e-5, err
    print(f"OK {len(specs)} params, max err {err:.2e}")


if __name__ == "__main__":
    main()
