"""`python -m kosmos2_jax.ablate` on the tiny training config: a 2 x 2 grid x 2 seeds is 8 ordinary
train runs; killed mid-way and started again it skips what finished; the table is each run's own
metrics.jsonl; a bad key is refused before any run; `--print_commands` lines run as printed are
tabulated by `ablate table`. And a run's metrics.jsonl holds each step once across a kill."""

import json
import os
import signal
import shlex
import statistics
import subprocess
import sys

import pytest

from conftest import REPO

HERE = os.path.dirname(__file__)
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


def _config(data_root, spm):
    return f"{HERE}/train_tiny_config.py:{data_root},{spm}"


def _ablate(*args):
    return [sys.executable, "-m", "kosmos2_jax.ablate", *map(str, args)]


def _metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_lines(folder):
    return [r for r in _metrics(folder) if r["kind"] == "train"]


def test_a_grid_of_overrides_and_seeds_killed_and_resumed(shapes_tfds, small_spm, tmp_path):
    root = tmp_path / "abl"
    # the tiny config has model.text.dropout=0.1: (lr 3e-3, dropout 0.1) is the baseline itself
    cmd = _ablate("--config", _config(shapes_tfds, small_spm), "--workdir", root, "--sweep", "optim.lr=3e-3,0",
                  "--sweep", "model.text.dropout=0.1,0.0", "--seeds", 0, 1, "--set", "train.steps=3",
                  "--set", "train.ckpt_every=3", "--parallel", 2, "--no_plots")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=ENV,
                            start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "(3/8 runs finished)" in line:
            os.killpg(proc.pid, signal.SIGKILL)  # the ablation and the run(s) it had started
            break
    proc.wait(timeout=60)
    assert "8 runs: 4 variants x 2 seeds" in "".join(seen), "".join(seen)
    plan = json.loads((root / "ablation.json").read_text())
    names = [r["name"] for r in plan["runs"]]
    assert names[:2] == ["baseline/seed_0", "baseline/seed_1"] and len(names) == 8
    finished = [n for n in names if json.loads((root / n / "ablation_run.json").read_text())["finished"]]
    assert len(finished) in (3, 4), finished  # two at a time: the fourth may have finished with the third
    before = {n: (root / n / "metrics.jsonl").read_bytes() for n in finished}

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for n in finished:
        assert f"{n}: finished before, skipped" in again.stdout
        assert (root / n / "metrics.jsonl").read_bytes() == before[n]  # untouched
    results = json.loads((root / "results.json").read_text())
    rows = {r["variant"]: r for r in results["rows"]}
    assert set(rows) == {"baseline", "optim.lr=0", "model.text.dropout=0.0", "optim.lr=0+model.text.dropout=0.0"}
    for variant, row in rows.items():
        assert row["seeds"] == 2
        losses = [_train_lines(root / variant / f"seed_{s}")[-1]["loss"] for s in (0, 1)]
        for n in (0, 1):
            steps = [r["step"] for r in _train_lines(root / variant / f"seed_{n}")]
            assert steps == [1, 2, 3], steps  # each step once, the killed run's included
        cell = row["metrics"]["train_loss"]
        assert cell["median"] == pytest.approx(statistics.median(losses)) and cell["min"] == min(losses)
    base = rows["baseline"]["metrics"]["train_loss"]["median"]
    assert rows["optim.lr=0"]["metrics"]["train_loss"]["change"] == pytest.approx(
        rows["optim.lr=0"]["metrics"]["train_loss"]["median"] - base)
    # with lr 0 nothing is learned: the first step's loss is the baseline's (same init and batch),
    # the last one is not lower than it
    for s in (0, 1):
        first, frozen = _train_lines(root / "baseline" / f"seed_{s}"), _train_lines(root / "optim.lr=0" / f"seed_{s}")
        assert frozen[0]["loss"] == pytest.approx(first[0]["loss"], abs=1e-6)
        assert frozen[0]["lr"] == 0.0
    table = (root / "results.md").read_text()
    assert "| baseline | 2 |" in table and "train_loss" in table and ("(+" in table or "(−" in table)


def test_bad_keys_are_refused_before_any_run_and_print_commands_run_as_printed(shapes_tfds, small_spm, tmp_path):
    config = _config(shapes_tfds, small_spm)
    bad = subprocess.run(_ablate("--config", config, "--workdir", tmp_path / "bad", "--sweep", "optim.lrr=1,2"),
                         capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert bad.returncode == 2 and "optim.lrr" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "bad").exists()
    bad = subprocess.run(_ablate("--config", config, "--workdir", tmp_path / "bad", "--sweep", "optim.optimizer=sgdd"),
                         capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert bad.returncode == 2 and "sgdd" in bad.stderr, bad.stderr

    root = tmp_path / "pod"
    printed = subprocess.run(_ablate("--config", config, "--workdir", root, "--sweep", "optim.warmup_steps=1",
                                     "--set", "train.steps=2", "--print_commands"),
                             capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert printed.returncode == 0, printed.stderr
    lines = [line for line in printed.stdout.splitlines() if "kosmos2_jax.train" in line]
    assert len(lines) == 2 and not (root / "baseline" / "seed_0" / "metrics.jsonl").exists()
    for line in lines:  # as a scheduler would run them
        run = subprocess.run(shlex.split(line), capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    table = subprocess.run(_ablate("table", root), capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert table.returncode == 0, table.stderr
    assert (root / "curves_train_loss.png").stat().st_size > 10_000  # a line per variant (matplotlib)
    results = json.loads((root / "results.json").read_text())
    assert [r["variant"] for r in results["rows"]] == ["baseline", "optim.warmup_steps=1"]
    loss = _train_lines(root / "optim.warmup_steps=1" / "seed_0")[-1]["loss"]
    assert results["rows"][1]["metrics"]["train_loss"]["median"] == loss
    # another sweep in the same folder would give a run other settings: refused, naming both
    clash = subprocess.run(_ablate("--config", config, "--workdir", root, "--sweep", "optim.warmup_steps=1",
                                   "--set", "train.steps=3", "--print_commands"),
                           capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert clash.returncode == 2 and "holds a run of other settings" in clash.stderr, clash.stderr


def test_metrics_file_holds_each_step_once_after_a_kill_and_resume(shapes_tfds, small_spm, tmp_path):
    """Killed after step 6 of 8 (the last checkpoint at 4): the resumed run drops the lines of steps
    5 and 6 and logs them again."""
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "kosmos2_jax.train", f"--config={_config(shapes_tfds, small_spm)}",
           f"--workdir={work}", "--config.train.steps=8", "--config.train.eval_every=4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=ENV)
    for line in proc.stdout:
        if line.startswith("step 6/8"):
            proc.kill()
            break
    proc.wait(timeout=60)
    assert _train_lines(work)[-1]["step"] >= 5  # past the checkpoint of step 4: lines the resume drops
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    records = _metrics(work)
    assert [r["step"] for r in _train_lines(work)] == list(range(1, 9))
    assert [r["step"] for r in records if r["kind"] == "val"] == [4, 8]
