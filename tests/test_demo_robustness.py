"""benchmarks/demo_robustness.py as it is run, shortened: the demo recipe on a tiny build of the demo
data (`--data`), two seeds of a few steps at once, and the table it prints; its refusals."""

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "demo_robustness.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import demo_robustness  # noqa: E402


def test_last_third_spread():
    curve = [(250, 7.0), (1000, 68.8), (1500, 82.0), (1750, 89.8), (2000, 89.1)]
    assert demo_robustness.last_third_spread(curve, 2000) == pytest.approx(7.8)
    assert math.isnan(demo_robustness.last_third_spread([(100, 5.0)], 2000))  # no evaluation in the last third


def test_refuses_missing_data(tmp_path, capsys):
    assert demo_robustness.main(["--data", str(tmp_path / "none"), "--workdir", str(tmp_path / "w")]) == 2
    assert f"the demo data is not in {tmp_path / 'none'}: run `make demo-data DEMO_DATA=" in capsys.readouterr().err
    data = tmp_path / "data"
    (data / "spm").mkdir(parents=True)
    (data / "spm" / "shapes.model").touch()
    for config in ("grounded", "refexp"):
        (data / "tfds" / "shapes" / config / "1.0.0").mkdir(parents=True)
        if config == "grounded":  # a half-built dataset (no refexp dataset_info.json) is refused too
            (data / "tfds" / "shapes" / config / "1.0.0" / "dataset_info.json").touch()
    assert demo_robustness.main(["--data", str(data), "--workdir", str(tmp_path / "w")]) == 2
    assert "the demo data is not in" in capsys.readouterr().err


@pytest.mark.skipif(subprocess.run(["make", "--version"], capture_output=True).returncode != 0,
                    reason="no make on this machine")
def test_two_seeds_on_a_tiny_build(tmp_path):
    stamp = tmp_path / "installed"  # this interpreter already has the package: no install
    stamp.touch()
    data = tmp_path / "demo_data"
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS",)}
    built = subprocess.run(["make", "-s", "demo-data", f"PY={sys.executable}", f"CORE_STAMP={stamp}",
                            f"DEMO_DATA={data}", "SHAPES_NUM_TRAIN=48", "SHAPES_NUM_EVAL=12"],
                           cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]
    flags = ["--config.train.steps=4", "--config.train.batch_size=4", "--config.train.log_every=2",
             "--config.train.eval_every=4", "--config.evals.grounding.every=2", "--config.train.ckpt_every=4",
             "--config.evals.grounding.max_items=4", "--config.data.val_batches=1", "--config.data.shuffle_buffer=16"]
    out = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "0", "1", "--parallel", "2", "--data", str(data),
                          "--workdir", str(tmp_path / "runs"), *[f"--override={f}" for f in flags]],
                         cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    rows = [line for line in out.stdout.splitlines() if re.match(r"\| [01] \| ", line)]
    assert len(rows) == 2, out.stdout
    for row in rows:  # seed | accuracy | items | train | eval | curve (steps 2 and 4) | spread
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert 0 <= float(cells[1]) <= 100 and int(cells[2]) > 0, row
        assert re.fullmatch(r"2: [\d.]+, 4: [\d.]+", cells[5]), row
    assert re.search(r"median [\d.]+%, min [\d.]+%, max [\d.]+% over 2 seeds \(parallel=2\)", out.stdout), out.stdout
    # each run's training log, written as it ran, and its evaluation, from the data given: an
    # ablation's runs, which `ablate table` tabulates
    for seed in (0, 1):
        log = (tmp_path / "runs" / "baseline" / f"seed_{seed}" / "train.log").read_text()
        assert f"training records (train of {data}" in log and "step 4 eval grounding" in log, log
        assert (tmp_path / "runs" / "baseline" / f"seed_{seed}" / "eval" / "shapes.json").is_file()
    again = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "0", "1", "--data", str(data), "--workdir",
                            str(tmp_path / "runs"), *[f"--override={f}" for f in flags]],
                           cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0 and again.stdout.count("finished before, skipped") == 2, again.stdout[-3000:]
    table = subprocess.run([sys.executable, "-m", "kosmos2_jax.ablate", "table", str(tmp_path / "runs"), "--no_plots"],
                           cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert table.returncode == 0 and "| baseline | 2 |" in table.stdout, table.stdout + table.stderr
