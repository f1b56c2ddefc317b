"""`--xla_gpu_preset`: the GPU preset's XLA flags are flags this jaxlib knows (XLA parses XLA_FLAGS
on any backend and aborts on an unknown one), and they are added only on GPU machines, never over
a flag the user set."""

import os
import subprocess
import sys

import pytest

from kosmos2_jax.utils import cli


def _starts(flags: str) -> bool:
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"], env=env,
                          capture_output=True, timeout=120).returncode == 0


def test_every_preset_flag_exists_in_this_jaxlib():
    flags = " ".join(f"--{k}={v}" for k, v in cli.GPU_XLA_PRESETS["training"].items())
    assert _starts(flags)
    assert not _starts(flags + " --xla_gpu_enable_flash_everything=true")  # the check can fail


def test_flags_are_added_on_gpu_only_and_never_override(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false")
    assert cli.use_gpu_xla_flags("training", on_gpu=False) == []
    added = cli.use_gpu_xla_flags("training", on_gpu=True)
    assert len(added) == len(cli.GPU_XLA_PRESETS["training"]) - 1
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in os.environ["XLA_FLAGS"]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in os.environ["XLA_FLAGS"]
    assert cli.use_gpu_xla_flags("training", on_gpu=True) == []  # added once
    assert cli.use_gpu_xla_flags("none", on_gpu=True) == []
    with pytest.raises(cli.UsageError, match="--xla_gpu_preset 'fast': must be one of training, none"):
        cli.use_gpu_xla_flags("fast")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not cli.gpu_machine()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert cli.gpu_machine()
