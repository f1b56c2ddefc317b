import os
import subprocess
import sys
import pathlib

import jax
import pytest
from jax.sharding import PartitionSpec as P

from kosmos2_jax.models import sharding

from conftest import xla_flags  # noqa: E402

HERE = pathlib.Path(__file__).parent


@pytest.mark.parametrize("layers", ["scan", "loop"])
def test_sharded_forward_equals_single_device(layers):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(HERE / "sharded_forward_check.py"), layers], env=env,
                         capture_output=True, text=True, cwd=HERE.parent, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout


def test_spec_rules():
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    assert mesh.shape == {"data": len(jax.devices()), "fsdp": 1, "tensor": 1}
    assert sharding.spec_for((4, 8), ("embed", "heads"), mesh) == P(None, None)  # size-1 axes are dropped
    with pytest.raises(ValueError, match="'nope'"):
        sharding.spec_for((4,), ("nope",), mesh)
    with pytest.raises(ValueError, match="needs 3 devices"):
        sharding.create_mesh({"data": 3, "fsdp": 1, "tensor": 1})
