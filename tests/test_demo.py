"""`make demo` as a newcomer runs it, shortened: the Makefile's own targets (tokenizer, datasets,
the demo config `experiments/shapes_tiny.py` at its full model size, evaluation with pictures), with
fewer records and steps. Its console must be quiet and say what it does."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(subprocess.run(["make", "--version"], capture_output=True).returncode != 0,
                    reason="no make on this machine")
def test_make_demo_trains_and_evaluates(tmp_path):
    stamp = tmp_path / "installed"  # this interpreter already has the package: no install
    stamp.touch()
    data, run = tmp_path / "demo_data", tmp_path / "run"
    flags = ("--config.train.steps=12 --config.train.batch_size=8 --config.train.log_every=6 "
             "--config.train.eval_every=12 --config.evals.grounding.every=12 --config.train.ckpt_every=12 "
             "--config.evals.grounding.max_items=4 --config.data.val_batches=1 --config.data.shuffle_buffer=16")
    def make_demo(flags):
        return subprocess.run(["make", "-s", "demo", f"PY={sys.executable}", f"CORE_STAMP={stamp}", f"DEMO_DATA={data}",
                               f"DEMO_RUN={run}", "SHAPES_NUM_TRAIN=48", "SHAPES_NUM_EVAL=12", f"DEMO_FLAGS={flags}"],
                              cwd=REPO, capture_output=True, text=True, timeout=900,
                              env={k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS",)})

    out = make_demo(flags)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]
    # the run says what it will do and how long it should take
    assert "parameters" in console and "plan: steps 1-12 of 8 rows" in console, console
    assert "48 training records" in console and "expected:" in console and "s/step here" in console, console
    assert "step 12 eval grounding: accuracy" in console, console
    # quiet: no TensorFlow/oneDNN or absl start-up banners, no Python warnings
    for noise in ("oneDNN", "absl::InitializeLog", "Warning:", "WARNING"):
        assert noise not in console, (noise, console)
    # the demo's own model, exported, scored; the table and the pictures are where it says
    assert "exported the params of step 12" in console, console
    config = json.loads((run / "model_config.json").read_text())
    assert config["text"]["embed_dim"] == 192 and config["vision"]["image_size"] == 48
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["task"] == "shapes" and results["scored"] > 0
    hits = [p["hit"] for p in results["predictions"]]
    assert len(hits) == results["scored"] and results["accuracy"] == pytest.approx(100 * sum(hits) / len(hits))
    assert "| shapes | test |" in out.stdout and f"{results['accuracy']:.1f}" in out.stdout, out.stdout
    pictures = sorted((run / "eval").glob("example_*.png"))
    assert pictures and f"annotated examples to {run / 'eval'}" in out.stdout, out.stdout

    # the same command again: nothing trained, the export untouched, the same results re-scored
    export = {p: p.stat().st_mtime_ns for p in (run / "export").rglob("*")}
    again = make_demo(flags)
    console = again.stdout + again.stderr
    assert again.returncode == 0, console[-3000:]
    assert f"nothing to train: {run} holds step 12 of train.steps=12 and {run / 'export'} holds its params" in console
    assert "plan:" not in console and "exported" not in console, console
    assert {p: p.stat().st_mtime_ns for p in (run / "export").rglob("*")} == export
    rescored = json.loads((run / "eval" / "results.json").read_text())
    assert rescored["predictions"] == results["predictions"] and rescored["accuracy"] == results["accuracy"]

    # more steps (the README's suggestion): trains on, exports, and the new results replace the old
    more = make_demo(flags.replace("--config.train.steps=12", "--config.train.steps=14"))
    console = more.stdout + more.stderr
    assert more.returncode == 0, console[-3000:]
    assert "resumed from step 12" in console and "plan: steps 13-14" in console, console
    assert json.loads((run / "export" / "step.json").read_text()) == {"step": 14}
    assert json.loads((run / "eval" / "results.json").read_text())["run_key"] != results["run_key"]
