"""benchmarks/device_check.sh --dry-run: the accelerator session's script works before an
accelerator is lent (tiny shapes on the CPU), and writes one file with both tables."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_device_check_dry_run_writes_both_tables(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    out = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "device_check.md").read_text()
    assert "exit " not in report, report[-3000:]
    assert "| batch | layerwise tok/s (compile s) | layerwise / HF | fused tok/s (compile s) | fused / HF | HF tok/s |" in report
    assert "| 2 |" in report and "MFU" in report, report[-3000:]
