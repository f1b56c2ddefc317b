"""The whole training lifecycle on 2 processes x 2 CPU devices (jax.distributed over gloo), through
the CLI: mesh data=2 x fsdp=2, so every parameter and batch spans processes, with packing on.

One chain of runs shares its work between the checks (a 2-process launch costs about a minute on
2 cores): A, uninterrupted, with periodic validation and grounding evaluation; B, one process on 4
devices reading the data as 2 host shards; C, a SIGTERM to process 1 only, then a SIGKILL of both,
each followed by a restart.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import xla_flags, REPO

HERE = os.path.dirname(__file__)


def _port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train(workdir, data_root, spm, *extra):
    # a mixture of two sources (the grounded records, and the same records as plain pairs): the
    # per-source log line is exact on any process count
    caption = os.path.join(data_root, "shapes", "grounded", "1.0.0")
    return [sys.executable, "-m", "kosmos2_jax.train", f"--config={HERE}/train_tiny_config.py:{data_root},{spm}",
            f"--workdir={workdir}", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.data.pack=True",
            f"--config.data.sources.caption.data_dir={caption}", "--config.data.sources.caption.weight=300",
            # 16 image slots per batch shard, 2-4 real images: every step compacts them into a
            # 4-slot block (one step program, compiled once)
            "--config.data.pack_max_images=8", "--config.train.async_ckpt=True", *extra]


def _launch(args, processes=2, devices=2, cache=""):
    """`args` as the `processes` processes of one jax.distributed job (or one plain process).
    `cache`: a persistent compilation cache, so that restarts of one job don't compile again
    (the same executables, so the same bits; saves ~20 s a launch on 2 cores)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=xla_flags(devices))
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    port, procs = _port(), []
    for pid in range(processes):
        dist = []
        if processes > 1 and args[2] == "kosmos2_jax.train":
            dist = ["--config.distributed=True", f"--config.num_processes={processes}", f"--config.process_id={pid}",
                    f"--config.coordinator_address=localhost:{port}"]
        elif processes > 1:
            dist = ["--distributed", f"--num_processes={processes}", f"--process_id={pid}",
                    f"--coordinator_address=localhost:{port}"]
        procs.append(subprocess.Popen(args + dist, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env, cwd=REPO))
    return procs


def _finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs[0]


def _losses(text):
    """{step: loss string} of the train log lines (6 decimals)."""
    return {int(line.split()[1].split("/")[0]): line.split()[3] for line in text.splitlines()
            if line.startswith("step ") and "/" in line.split()[1] and " loss " in line}


def _lines(text, what):
    return [line for line in text.splitlines() if what in line]


def _params(folder):
    from kosmos2_jax import weights
    from kosmos2_jax import convert

    return jax.device_get(weights.load_checkpoint(str(folder))[1])


def test_two_process_lifecycle_through_the_cli(shapes_tfds, small_spm, tmp_path):
    evals = ["--config.train.eval_every=6", "--config.evals.grounding.every=12"]
    # A: uninterrupted, 2 processes
    cache = tmp_path / "jax_cache"
    a = _finish(_launch(_train(tmp_path / "a", shapes_tfds, small_spm, *evals), cache=cache))
    assert "4 cpu devices on 2 process(es); mesh data=2 fsdp=2 tensor=1" in a and "fresh start" in a, a[-3000:]
    losses_a = _losses(a)
    assert sorted(losses_a) == list(range(1, 13)), a[-3000:]
    fills = [line.split("fill: tokens ")[1].split()[:3] for line in a.splitlines() if " loss " in line and "/" in line]
    # the vision tower ran on the compacted real images (without compaction, image fill <= 4/16)
    assert len(fills) == 12 and all(0.3 < float(t) <= 1 and 0.3 < float(im) <= 1 for t, _, im in fills), fills
    # B: the same global batches on one process with 4 devices (the grounding evaluation's
    # 1-process equality is evaluate's, below: the same batching and scoring code)
    b = _finish(_launch(_train(tmp_path / "b", shapes_tfds, small_spm, evals[0], "--config.data.shards=2"), 1, 4))
    np.testing.assert_allclose([float(losses_a[s]) for s in range(1, 13)],
                               [float(v) for _, v in sorted(_losses(b).items())], atol=1e-5)
    sources_a, sources_b = (_lines(t, "  sources: ") for t in (a, b))
    assert len(sources_a) == 12 and "caption loss" in sources_a[0] and "train loss" in sources_a[0], a[-3000:]
    number = lambda line: [float(w.rstrip(",")) for w in line.split() if w.rstrip(",").replace(".", "").isdigit()]
    for line_a, line_b in zip(sources_a, sources_b):  # losses to 4 decimals, examples exactly
        np.testing.assert_allclose(number(line_a), number(line_b), atol=2e-4, err_msg=f"{line_a}\n{line_b}")
        assert line_a.split("examples")[0].split()[-1] == line_b.split("examples")[0].split()[-1]
    val_a, val_b = (_lines(t, "validation loss") for t in (a, b))
    assert len(val_a) == len(val_b) == 2
    np.testing.assert_allclose([float(x.split()[4]) for x in val_a], [float(x.split()[4]) for x in val_b], atol=1e-5)
    assert len(_lines(a, "step 12 eval grounding: accuracy")) == 1
    export_a = _params(tmp_path / "a" / "export")
    # the same command again on 2 processes: nothing trained, the export (its step recorded) untouched
    assert json.loads((tmp_path / "a" / "export" / "step.json").read_text()) == {"step": 12}
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "a" / "export").rglob("*")}
    again = _finish(_launch(_train(tmp_path / "a", shapes_tfds, small_spm, *evals), cache=cache))
    assert "nothing to train" in again and "exported" not in again, again[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a" / "export").rglob("*")} == stamps
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), export_a,
                           _params(tmp_path / "b" / "export"))

    # C: SIGTERM to process 1 only -> both save the same step and exit 0
    c = tmp_path / "c"
    procs = _launch(_train(c, shapes_tfds, small_spm), cache=cache)
    seen = _sigterm_process_1_at(procs, 2)
    saved = [int(x.split("saved step ")[1].split(",")[0]) for x in _lines(seen, "SIGTERM: saved step")]
    assert len(saved) == 1 and 2 <= saved[0] < 12, seen[-3000:]
    assert str(saved[0]) in os.listdir(c / "checkpoints") and not (c / "export").exists()
    # restart, then SIGKILL both processes right after the step-8 checkpoint
    procs = _launch(_train(c, shapes_tfds, small_spm), cache=cache)
    second = ""
    for line in procs[0].stdout:
        second += line
        if line.startswith("step 9/"):
            for p in procs:
                p.send_signal(signal.SIGKILL)
            break
    for p in procs:
        p.wait(timeout=60)
    assert f"resumed from step {saved[0]}" in second, second[-3000:]
    third = _finish(_launch(_train(c, shapes_tfds, small_spm), cache=cache))
    # step 8's async save may not have been committed when the kill came: then it resumes from 4
    assert "resumed from step 8" in third or "resumed from step 4" in third, third[-3000:]
    resumed = {**_losses(seen), **_losses(second), **_losses(third)}
    assert resumed == losses_a, (resumed, losses_a)
    jax.tree_util.tree_map(np.testing.assert_array_equal, _params(c / "export"), export_a)

    # `python -m kosmos2_jax.export` restores the 2-process checkpoint onto this process's one device
    from kosmos2_jax import export

    assert export.main(["--workdir", str(c), "--out", str(tmp_path / "exported")]) == 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, _params(tmp_path / "exported"), export_a)
    assert export.main(["--workdir", str(c), "--step", "3", "--out", str(tmp_path / "x")]) == 2
    from kosmos2_jax import weights
    from kosmos2_jax import convert  # and `convert to-hf` streams it into HF safetensors

    assert convert.main(["to-hf", "--checkpoint", str(c / "export"), "--out", str(tmp_path / "hf")]) == 0
    from_hf = jax.device_get(weights.load_hf(str(tmp_path / "hf"), scan_layers=True)[1])
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_hf, export_a)

    # every process saved its own data position (packing: they differ) in the one checkpoint
    from kosmos2_jax.train.checkpoints import Checkpoints

    ckpts = Checkpoints(str(c), 4, 3, async_save=False)
    states = ckpts.data_states(12)
    ckpts.close()
    assert len(states) == 2 and states[0] != states[1], states

    # a restart on another process count: a clear error before any work (`run` is what the CLI
    # calls; the check comes before the mesh, which this one-device process could not build)
    sys.path.insert(0, HERE)
    import train_tiny_config

    from kosmos2_jax.train.loop import run

    cfg = train_tiny_config.get_config(f"{shapes_tfds},{small_spm}")
    cfg.mesh.update(data=2, fsdp=2)
    cfg.data.update(pack=True, pack_max_images=8)
    cfg.data.sources.caption.update(data_dir=str(shapes_tfds / "shapes" / "grounded" / "1.0.0"), weight=300.0)
    cfg.train.async_ckpt = True
    with pytest.raises(ValueError, match=r"written reading the data as 2 host shard\(s\).*this run has 1 process"):
        run(cfg, str(c))
    # ... and the documented re-split: one process reading both shards resumes the 2-process
    # checkpoint of step 8 exactly, here on another mesh too (one device)
    shutil.copytree(c, tmp_path / "c1", ignore=shutil.ignore_patterns("export"))
    shutil.rmtree(tmp_path / "c1" / "checkpoints" / "12")
    cfg.mesh.update(data=1, fsdp=1)
    cfg.data.shards = 2
    history = run(cfg, str(tmp_path / "c1"))["history"]
    assert [h["step"] for h in history] == [9, 10, 11, 12]
    np.testing.assert_allclose([h["loss"] for h in history], [float(losses_a[s]) for s in (9, 10, 11, 12)],
                               atol=1e-5)

    # `evaluate` of the export: 2 processes give what 1 process gives
    from kosmos2_jax import evaluate

    refexp = str(shapes_tfds / "shapes" / "refexp" / "1.0.0")
    common = ["--task", "shapes", "--checkpoint", str(tmp_path / "a" / "export"), "--tokenizer", small_spm,
              "--data_dir", refexp, "--split", "test", "--batch_size", "3"]
    assert evaluate.main(common + ["--out", str(tmp_path / "one.json")]) == 0
    _finish(_launch([sys.executable, "-m", "kosmos2_jax.evaluate", *common, "--out", str(tmp_path / "two.json")]))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["count"] == two["count"] > 6  # more than one batch on each process
    assert one["metrics"] == two["metrics"] and one["predictions"] == two["predictions"]
    assert len(list(tmp_path.glob("two.predictions.process_*-of-2.jsonl"))) == 2


def test_muon_on_two_processes_equals_one(shapes_tfds, small_spm, tmp_path):
    """`optim.optimizer=muon` through the CLI as a pod runs it: 2 processes, fsdp spanning them,
    the same losses as one process with the same 4 devices."""
    muon = ["--config.optim.optimizer=muon", "--config.train.steps=4", "--config.evals.grounding.every=0"]
    two = _finish(_launch(_train(tmp_path / "a", shapes_tfds, small_spm, *muon)))
    assert "on 2 process(es); mesh data=2 fsdp=2" in two, two[-3000:]
    one = _finish(_launch(_train(tmp_path / "b", shapes_tfds, small_spm, *muon, "--config.data.shards=2"), 1, 4))
    losses_two, losses_one = _losses(two), _losses(one)
    assert sorted(losses_two) == [1, 2, 3, 4], two[-3000:]
    np.testing.assert_allclose([float(losses_two[s]) for s in range(1, 5)],
                               [float(losses_one[s]) for s in range(1, 5)], atol=1e-5)


def test_lora_on_two_processes_equals_one(shapes_tfds, small_spm, tmp_path):
    """LoRA fine-tuning (train.lora) as a pod runs it: 2 processes x 2 devices, fsdp spanning them,
    SIGTERM to process 1 at step 2, then the same command finishes it: the losses and the merged
    export of 1 process on the same 4 devices, uninterrupted."""
    cache = tmp_path / "jax_cache"
    lora = ["--config.train.lora.rank=4", "--config.train.steps=6", "--config.evals.grounding.every=0"]
    first = _sigterm_process_1_at(_launch(_train(tmp_path / "a", shapes_tfds, small_spm, *lora), cache=cache), 2)
    assert "on 2 process(es); mesh data=2 fsdp=2" in first and "in LoRA adapters" in first, first[-3000:]
    assert len(_lines(first, "SIGTERM: saved step")) == 1, first[-3000:]
    second = _finish(_launch(_train(tmp_path / "a", shapes_tfds, small_spm, *lora), cache=cache))
    assert "resumed from step" in second, second[-3000:]
    one = _finish(_launch(_train(tmp_path / "b", shapes_tfds, small_spm, *lora, "--config.data.shards=2"), 1, 4))
    _equal_to_uninterrupted([first, second], one, tmp_path / "a" / "export", tmp_path / "b" / "export")


def test_two_slices_over_the_data_center_network_equal_one_process(shapes_tfds, small_spm, tmp_path):
    """mesh.dcn_data=2 on 2 processes x 2 devices (each process a slice: fsdp inside it, data
    across): the losses of 1 process on 4 devices; a SIGTERM saves, the restart finishes, the
    export equals the one-process run's."""
    cache = tmp_path / "jax_cache"
    dcn = ["--config.mesh.dcn_data=2", "--config.mesh.data=1", "--config.mesh.fsdp=2"]
    one = _finish(_launch(_train(tmp_path / "one", shapes_tfds, small_spm, "--config.data.shards=2"), 1, 4))
    procs = _launch(_train(tmp_path / "dcn", shapes_tfds, small_spm, *dcn), cache=cache)
    first = _sigterm_process_1_at(procs, 5)
    assert "mesh data=2 fsdp=2 tensor=1" in first and len(_lines(first, "SIGTERM: saved step")) == 1, first[-3000:]
    second = _finish(_launch(_train(tmp_path / "dcn", shapes_tfds, small_spm, *dcn), cache=cache))
    assert "resumed from step" in second, second[-3000:]
    _equal_to_uninterrupted([first, second], one, tmp_path / "dcn" / "export", tmp_path / "one" / "export")
    # a dcn_data that the processes do not make is one line naming both counts
    bad = _finish_failing(_launch(_train(tmp_path / "bad", shapes_tfds, small_spm, "--config.mesh.dcn_data=4",
                                         "--config.mesh.data=1", "--config.mesh.fsdp=1"), cache=cache))
    assert "mesh.dcn_data=4" in bad, bad[-2000:]


def _sigterm_process_1_at(procs, step: int) -> str:
    """SIGTERM to process 1 once process 0 logs `step`; both must save and exit 0 -> process 0's log."""
    first = ""
    for line in procs[0].stdout:
        first += line
        if line.startswith(f"step {step}/"):
            procs[1].send_signal(signal.SIGTERM)
    rest = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], first[-3000:] + rest[1][-3000:]
    return first


def _equal_to_uninterrupted(logs, reference_log, export, reference_export):
    """The losses of a stopped and resumed run (its logs) and its export equal the uninterrupted run's."""
    losses = {step: loss for log in logs for step, loss in _losses(log).items()}
    reference = _losses(reference_log)
    assert sorted(losses) == sorted(reference), (sorted(losses), sorted(reference))
    np.testing.assert_allclose([float(losses[s]) for s in sorted(reference)],
                               [float(reference[s]) for s in sorted(reference)], atol=1e-5)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), _params(export),
                           _params(reference_export))


def _finish_failing(procs, timeout=300):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 2 for p in procs), outs[0][-3000:]
    return outs[0]


def test_a_run_resumes_on_another_process_count_both_ways(shapes_tfds, small_spm, tmp_path):
    """1 process x 4 devices reading 2 data shards, SIGTERM at step 5; the same command on 2
    processes x 2 devices (a shard each), each process a slice (mesh.dcn_data=2: onto a
    multi-slice mesh), finishes it with the losses and export of the uninterrupted 1-process run;
    and the other way, 2 processes stopped at step 5 finish on 1 process."""
    cache = tmp_path / "jax_cache"
    one = _train(tmp_path / "one", shapes_tfds, small_spm, "--config.data.shards=2")
    whole = _finish(_launch(one, 1, 4, cache=cache))
    run = _train(tmp_path / "run", shapes_tfds, small_spm, "--config.data.shards=2")
    proc = _launch(run, 1, 4, cache=cache)[0]
    first = ""
    for line in proc.stdout:
        first += line
        if line.startswith("step 5/"):
            proc.send_signal(signal.SIGTERM)
    first += proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and len(_lines(first, "SIGTERM: saved step")) == 1, first[-3000:]
    slices = ["--config.mesh.dcn_data=2", "--config.mesh.data=1", "--config.mesh.fsdp=2"]
    second = _finish(_launch(run + slices, 2, 2, cache=cache))
    assert "resumed from step" in second and "mesh data=2 fsdp=2" in second, second[-3000:]
    _equal_to_uninterrupted([first, second], whole, tmp_path / "run" / "export", tmp_path / "one" / "export")

    back = _train(tmp_path / "back", shapes_tfds, small_spm, "--config.data.shards=2")
    procs = _launch(back, 2, 2, cache=cache)
    first = _sigterm_process_1_at(procs, 5)
    second = _finish(_launch(back, 1, 4, cache=cache))
    assert "resumed from step" in second, second[-3000:]
    _equal_to_uninterrupted([first, second], whole, tmp_path / "back" / "export", tmp_path / "one" / "export")
