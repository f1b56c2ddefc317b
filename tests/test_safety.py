"""Nothing lost, nothing mixed: atomic outputs, keyed resumes, arguments checked before any work
(README "Errors and safety"). Each command is driven as a user runs it: `main(argv)` in-process for
the argument checks, subprocesses where a kill or the process's own exit matters."""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, save_tiny_checkpoint

HERE = os.path.dirname(__file__)
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


# --- helpers ---------------------------------------------------------------------------------------
def snapshot(*roots):
    """Every file under `roots` with its size and content hash: what "no change on disk" compares."""
    out = {}
    for root in roots:
        root = str(root)
        if os.path.isfile(root):
            out[root] = hashlib.sha256(open(root, "rb").read()).hexdigest()
        for dirpath, dirs, files in os.walk(root):
            for name in dirs:
                out[os.path.join(dirpath, name)] = "dir"
            for name in files:
                path = os.path.join(dirpath, name)
                out[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def call(main, argv, capsys):
    """rc and stderr of an in-process CLI call (argparse errors exit through SystemExit)."""
    capsys.readouterr()  # what earlier calls printed
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line(err, *names):
    text = err.strip()
    assert text and "\n" not in text and "Traceback" not in text, err
    for name in names:
        assert name in text, (name, text)


def run_cli(module, *args, env=ENV):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env)


def kill_at_commit(module, *args):
    """Start a command that pauses just before it commits its output, SIGKILL it there."""
    kill_at_line(module, "about to commit", {"KOSMOS2_TEST_PAUSE_BEFORE_COMMIT": "60"}, *args)


def kill_at_line(module, prefix, env, *args):
    """Start a command (with `env` added), SIGKILL it when it prints a line starting with `prefix`."""
    proc = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, env=dict(ENV, **env))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]


def train_cmd(workdir, data_root, spm, *extra):
    return [sys.executable, "-m", "kosmos2_jax.train", f"--config={HERE}/train_tiny_config.py:{data_root},{spm}",
            f"--workdir={workdir}", *extra]


@pytest.fixture(scope="module")
def run_dir(shapes_tfds, small_spm, tmp_path_factory):
    """A finished 8-step run (checkpoints of steps 4 and 8, and its export): the intact run the
    tests below try to damage. Tests copy it before changing it."""
    workdir = tmp_path_factory.mktemp("safety") / "run"
    done = subprocess.run(train_cmd(workdir, shapes_tfds, small_spm, "--config.train.steps=8"), capture_output=True,
                          text=True, cwd=REPO, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "oneDNN" not in done.stdout + done.stderr  # TensorFlow's banner is off (kosmos2_jax/__init__.py)
    return workdir


@pytest.fixture(scope="module")
def ckpts(small_spm, tmp_path_factory):
    """Two different tiny params checkpoints and the HF folder of the first."""
    from kosmos2_jax import weights
    from kosmos2_jax import convert

    root = tmp_path_factory.mktemp("ckpts")
    first = save_tiny_checkpoint(root / "first", small_spm)
    model, params = weights.load_checkpoint(first)
    import jax

    other = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.01, params)
    weights.save_checkpoint(str(root / "other"), model.config, other)
    assert convert.main(["to-hf", "--checkpoint", first, "--out", str(root / "hf")]) == 0
    return {"first": first, "other": str(root / "other"), "hf": str(root / "hf")}


# --- convert ---------------------------------------------------------------------------------------
def half_written(src, dst):
    """A copy of a checkpoint with one parameter's files gone, as a kill mid-write leaves it."""
    shutil.copytree(src, dst)
    victims = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(dst, "params")) for f in fs
               if "/d/" in os.path.join(r, f) or "/c/" in os.path.join(r, f) or f.endswith(".zarray")]
    assert victims
    for path in victims:
        os.remove(path)
    return str(dst)


def test_to_hf_of_a_broken_checkpoint_leaves_the_hf_folder_as_it_was(ckpts, tmp_path, capsys):
    from kosmos2_jax import weights
    from kosmos2_jax import convert

    good = tmp_path / "hf"
    shutil.copytree(ckpts["hf"], good)
    before = snapshot(good)
    broken = half_written(ckpts["first"], tmp_path / "half")
    rc, err = call(convert.main, ["to-hf", "--checkpoint", broken, "--out", str(good)], capsys)
    assert rc == 2 and before == snapshot(good)
    assert_one_line(err, "--overwrite", str(good))
    rc, err = call(convert.main, ["to-hf", "--checkpoint", broken, "--out", str(good), "--overwrite"], capsys)
    assert rc == 2 and before == snapshot(good)
    assert_one_line(err, "half")
    assert not os.path.exists(f"{good}.partial")
    weights.load_hf(str(good))  # still loads


def test_from_hf_overwrite_replaces_the_checkpoint_whole(ckpts, tmp_path, capsys):
    from kosmos2_jax import weights
    from kosmos2_jax import convert

    out = tmp_path / "ckpt"
    assert convert.main(["from-hf", "--hf_dir", ckpts["hf"], "--out", str(out)]) == 0
    leaves = sorted(os.listdir(out / "params"))
    first = next(name for name in leaves if (out / "params" / name).is_dir())
    shutil.copytree(out / "params" / first, out / "params" / "stale.leftover")  # an old run's extra parameter
    before = snapshot(out)
    rc, err = call(convert.main, ["from-hf", "--hf_dir", ckpts["hf"], "--out", str(out)], capsys)
    assert rc == 2 and before == snapshot(out)
    assert_one_line(err, "--overwrite")
    assert convert.main(["from-hf", "--hf_dir", ckpts["hf"], "--out", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out / "params")) == leaves  # not merged with what was there


def test_convert_names_a_broken_config_file(ckpts, tmp_path, capsys):
    from kosmos2_jax import weights
    from kosmos2_jax import convert

    hf = tmp_path / "hf"
    shutil.copytree(ckpts["hf"], hf)
    (hf / "config.json").write_text('{"text_config": ')
    rc, err = call(convert.main, ["from-hf", "--hf_dir", str(hf), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and not os.path.exists(tmp_path / "o")
    assert_one_line(err, str(hf / "config.json"), "not valid JSON")


def test_convert_to_hf_killed_mid_write_keeps_the_previous_folder(ckpts, tmp_path):
    from kosmos2_jax import weights
    from kosmos2_jax import convert

    out = tmp_path / "hf"
    shutil.copytree(ckpts["hf"], out)
    before = snapshot(out)
    kill_at_commit("kosmos2_jax.convert", "to-hf", "--checkpoint", ckpts["other"], "--out", out, "--overwrite")
    assert snapshot(out) == before and os.path.isdir(f"{out}.partial")
    weights.load_hf(str(out))
    again = run_cli("kosmos2_jax.convert", "to-hf", "--checkpoint", ckpts["other"], "--out", out, "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    assert snapshot(out) != before and not os.path.exists(f"{out}.partial")
    _, params = weights.load_hf(str(out))
    _, other = weights.load_checkpoint(ckpts["other"])
    a, b = weights.state_dict_from_params(params), weights.state_dict_from_params(other)
    assert all(np.allclose(a[k], b[k]) for k in b)


# --- train -----------------------------------------------------------------------------------------
def test_train_refuses_another_model_before_writing_anything(run_dir, shapes_tfds, small_spm, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    before = snapshot(work)
    bad = subprocess.run(train_cmd(work, shapes_tfds, small_spm, "--config.train.steps=12",
                                   "--config.model.text.layers=3"), capture_output=True, text=True, cwd=REPO, env=ENV)
    assert bad.returncode == 2
    assert_one_line(bad.stderr, "text.layers: 2 vs 3", str(work))
    assert snapshot(work) == before
    from kosmos2_jax import export

    assert export.main(["--workdir", str(work), "--out", str(tmp_path / "e")]) == 0  # the run is intact


def test_train_user_errors_are_one_line(run_dir, shapes_tfds, small_spm, tmp_path):
    """A negative step count, a zero batch, an unknown key, a finished run given fewer steps:
    exit code 2, one line naming the setting, nothing written; --help says how to list the keys."""
    cases = [(tmp_path / "new", ["--config.train.steps=-5"], "config.train.steps=-5"),
             (tmp_path / "new", ["--config.train.batch_size=0"], "config.train.batch_size=0"),
             (tmp_path / "new", ["--config.train.stepz=3"], "--config.train.stepz"),
             (run_dir, ["--config.train.steps=4"], "is at step 8"),
             (run_dir, ["--config.train.freeze=vision"], "train.freeze"),
             (run_dir, ["--config.optim.optimizer=muon"], "optim.optimizer: 'adamw' -> 'muon'"),
             (tmp_path / "new", ["--config.train.freeze=vision"], "config.train.freeze='vision': must be one of"),
             (tmp_path / "new", ["--config=experiments/nope.py"], "no such file 'experiments/nope.py'"),
             (tmp_path / "new", ["--config=experiments/shapes_tiny.py:runlokal"], "unknown key 'runlokal'")]
    before = snapshot(run_dir)
    for workdir, extra, name in cases:
        bad = subprocess.run(train_cmd(workdir, shapes_tfds, small_spm, *extra), capture_output=True, text=True,
                             cwd=REPO, env=ENV)
        assert bad.returncode == 2, (extra, bad.stderr[-2000:])
        assert_one_line(bad.stderr, name)
    assert not os.path.exists(tmp_path / "new") and snapshot(run_dir) == before
    helped = subprocess.run([sys.executable, "-m", "kosmos2_jax.train", "--help"], capture_output=True, text=True,
                            cwd=REPO, env=ENV)
    assert "--print_config" in helped.stdout
    listed = subprocess.run(train_cmd(tmp_path / "new", shapes_tfds, small_spm, "--print_config"),
                            capture_output=True, text=True, cwd=REPO, env=ENV)
    assert listed.returncode == 0 and "grad_accum_steps" in listed.stdout and not os.path.exists(tmp_path / "new")


def test_a_damaged_step_is_named_and_an_earlier_one_resumes(run_dir, shapes_tfds, small_spm, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    data = [os.path.join(r, f) for r, _, fs in os.walk(work / "checkpoints" / "8" / "state") for f in fs
            if os.sep + "d" + os.sep in os.path.join(r, f)]
    assert data
    for path in data:
        os.remove(path)
    before = snapshot(work)
    bad = subprocess.run(train_cmd(work, shapes_tfds, small_spm, "--config.train.steps=8"), capture_output=True,
                         text=True, cwd=REPO, env=ENV)
    assert bad.returncode == 2
    assert_one_line(bad.stderr, "step 8", "--config.train.resume_step=4")
    assert snapshot(work) == before
    ok = subprocess.run(train_cmd(work, shapes_tfds, small_spm, "--config.train.steps=8",  # the run's own config
                                  "--config.train.resume_step=4"), capture_output=True, text=True, cwd=REPO, env=ENV)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "resumed from step 4" in ok.stdout and "step 5/8" in ok.stdout
    assert os.path.isdir(work / "damaged_checkpoints" / "8") and os.path.isdir(work / "checkpoints" / "8")
    assert (work / "checkpoints" / "8" / "state" / "d").is_dir()  # written again


def test_every_numeric_setting_of_train_is_range_checked(shapes_tfds, small_spm):
    import re

    import ml_collections

    from kosmos2_jax.utils.errors import UsageError
    from kosmos2_jax.train import config_check
    sys.path.insert(0, HERE)
    import train_tiny_config

    base = train_tiny_config.get_config(f"{shapes_tfds},{small_spm}")
    config_check.check(base)
    checked = 0
    for key, (kind, lo, hi, lo_open) in config_check.RANGES.items():
        *parents, leaf = key.split(".")
        bad = ["x", math.nan] + ([lo] if lo_open else [lo - 1] if lo is not None else []) \
            + ([hi + 1] if hi is not None else [])
        for value in bad:
            cfg = ml_collections.ConfigDict(base.to_dict())
            target = cfg
            for part in parents:
                target = target[part]
            assert leaf in target, key  # every checked key is one the configs have
            with target.ignore_type():
                target[leaf] = value
            with pytest.raises(UsageError, match=re.escape(f"config.{key}=")):
                config_check.check(cfg)
            checked += 1
    assert checked == sum(2 + (lo is not None) + (hi is not None) for _, lo, hi, _ in config_check.RANGES.values())
    for optim, message in ((dict(optimizer="sgd"), "config.optim.optimizer='sgd': must be one of adamw, muon"),
                           (dict(optimizer="muon", weight_decay_mask="matrices"),
                            "optim.optimizer=muon decays every parameter")):
        cfg = ml_collections.ConfigDict(base.to_dict())
        cfg.optim.update(optim)
        with pytest.raises(UsageError, match=re.escape(message)):
            config_check.check(cfg)
    cfg = ml_collections.ConfigDict(base.to_dict())
    cfg.optim.lr_multipliers = "vision_model"  # no factor
    with pytest.raises(UsageError, match=re.escape("config.optim.lr_multipliers: 'vision_model' is not REGEX=FACTOR")):
        config_check.check(cfg)
    cfg = ml_collections.ConfigDict(base.to_dict())
    cfg.mesh.rules = "embed=fsdp,mlp=model"
    with pytest.raises(UsageError, match=re.escape("config.mesh.rules='embed=fsdp,mlp=model': 'mlp=model': 'model' "
                                                   "is not a mesh axis")):
        config_check.check(cfg)


# --- export ----------------------------------------------------------------------------------------
def test_export_killed_mid_write_keeps_the_previous_export(run_dir, tmp_path, capsys):
    from kosmos2_jax import export
    from kosmos2_jax import weights
    from kosmos2_jax import convert

    out = tmp_path / "e"
    assert export.main(["--workdir", str(run_dir), "--step", "8", "--out", str(out)]) == 0
    before = snapshot(out)
    rc, err = call(export.main, ["--workdir", str(run_dir), "--step", "4", "--out", str(out)], capsys)
    assert rc == 2 and snapshot(out) == before
    assert_one_line(err, "--overwrite")
    kill_at_commit("kosmos2_jax.export", "--workdir", run_dir, "--step", 4, "--out", out, "--overwrite")
    assert snapshot(out) == before
    weights.load_checkpoint(str(out))
    again = run_cli("kosmos2_jax.export", "--workdir", run_dir, "--step", 4, "--out", out, "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "step 4" in again.stdout and snapshot(out) != before and not os.path.exists(f"{out}.partial")


# --- evaluate --------------------------------------------------------------------------------------
def _eval_args(ckpt, spm, shapes_tfds, out, *extra):
    return ["--task", "shapes", "--checkpoint", ckpt, "--tokenizer", spm, "--data_dir",
            str(shapes_tfds / "shapes" / "refexp" / "1.0.0"), "--max_examples", "3", "--batch_size", "2",
            "--out", str(out), *extra]


def test_evaluate_never_relabels_another_checkpoints_results(ckpts, small_spm, shapes_tfds, tmp_path, capsys):
    from kosmos2_jax import evaluate

    out = tmp_path / "eval" / "results.json"
    assert evaluate.main(_eval_args(ckpts["first"], small_spm, shapes_tfds, out)) == 0
    first = json.loads(out.read_text())
    assert first["unit"].startswith("percent") and first["scored"] == 3
    hits = [p["hit"] for p in first["predictions"]]
    assert first["accuracy"] == pytest.approx(100 * sum(hits) / len(hits))
    table = capsys.readouterr().out
    assert "| task | split | scored | missing | metric | ours | paper |" in table
    before = snapshot(out.parent)
    rc, err = call(evaluate.main, _eval_args(ckpts["other"], small_spm, shapes_tfds, out), capsys)
    assert rc == 2 and snapshot(out.parent) == before
    assert_one_line(err, "checkpoint_fingerprint", "--overwrite")
    out.unlink()  # the stream alone is keyed too
    rc, err = call(evaluate.main, _eval_args(ckpts["other"], small_spm, shapes_tfds, out), capsys)
    assert rc == 2 and not out.exists()
    assert_one_line(err, "predictions of another run", "checkpoint")
    assert evaluate.main(_eval_args(ckpts["other"], small_spm, shapes_tfds, out, "--overwrite")) == 0
    assert "resuming" not in capsys.readouterr().err
    assert json.loads(out.read_text())["run_key"]["checkpoint_fingerprint"] != first["run_key"]["checkpoint_fingerprint"]
    # the same params in another folder (a moved workdir): the same run, resumed, not refused
    moved = tmp_path / "moved"
    shutil.copytree(ckpts["other"], moved)
    assert evaluate.main(_eval_args(str(moved), small_spm, shapes_tfds, out)) == 0
    assert "resuming" in capsys.readouterr().err
    rc, err = call(evaluate.main, _eval_args(ckpts["other"], small_spm, shapes_tfds, out.parent), capsys)
    assert rc == 2
    assert_one_line(err, "argument --out", "is a folder")


def test_a_torn_last_prediction_line_is_dropped_not_glued_to(tmp_path):
    from kosmos2_jax.evaluation.runner import run_items

    jsonl = str(tmp_path / "p.jsonl")
    items = [{"id": str(i)} for i in range(4)]
    key = {"task": "t"}
    run_items(items[:2], lambda b: [{"v": it["id"]} for it in b], jsonl, 2, log=None, key=key)
    with open(jsonl, "a") as f:
        f.write('{"v": "2", "id": "2"')  # a kill mid-line
    records = run_items(items, lambda b: [{"v": it["id"]} for it in b], jsonl, 2, log=None, key=key)
    assert [r["v"] for r in records] == ["0", "1", "2", "3"]
    lines = open(jsonl).read().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) == 5  # the key and four records


def test_evaluate_scores_in_the_papers_units():
    from kosmos2_jax.evaluate import markdown
    from kosmos2_jax.evaluation.tasks import TASKS

    records = [{"hit": True}, {"hit": False}, {"hit": False, "missing_image": True}]
    assert TASKS["shapes"].score(records) == {"accuracy": 50.0}
    assert TASKS["refcoco"].score(records) == {"accuracy": 50.0}
    row = markdown("refcoco", "val", 2, 1, {"accuracy": 50.0}, {"accuracy": 52.32}).splitlines()[-1]
    assert row == "| refcoco | val | 2 | 1 | accuracy | 50.00 | 52.32 |"


# --- predict ---------------------------------------------------------------------------------------
@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (200, 100), (30, 120, 200)).save(path)
    return str(path)


def test_predict_box_units_and_prompt_characters(ckpts, small_spm, image, tmp_path, capsys):
    from kosmos2_jax import predict

    base = ["--checkpoint", ckpts["first"], "--tokenizer", small_spm, "--image", image, "--max_new_tokens", "2"]
    rc, err = call(predict.main, base + ["--prompt", "<grounding><phrase>a</phrase> is", "--box", "a=0.1,0.1,1.5,0.5"],
                   capsys)
    assert rc == 2
    assert_one_line(err, "--box", "--box_units px")
    assert predict.parse_box("a=20,10,100,50", (200, 100), "px") == ("a", (0.1, 0.1, 0.5, 0.5))
    rc, err = call(predict.main, base + ["--prompt", "<grounding><phrase>a</phrase> is", "--box", "a=20,10,100,50",
                                         "--box_units", "px", "--json", str(tmp_path / "o.json")], capsys)
    assert rc == 0, err
    # the prompt fed, its pixel box on the 32 x 32 grid included
    assert json.loads((tmp_path / "o.json").read_text())[0]["prompt"] == (
        "<grounding><phrase>a</phrase><object><patch_index_0099><patch_index_0495></object> is")
    rc, err = call(predict.main, base + ["--prompt", "<grounding>An image of"], capsys)  # no 'A' in this model
    assert rc == 2
    assert_one_line(err, "'A'", "cannot encode")
    rc, err = call(predict.main, base + ["--json", str(tmp_path / "o.json")], capsys)  # written above
    assert rc == 2
    assert_one_line(err, "--json", "--overwrite")
    assert call(predict.main, base + ["--prompt", "<grounding>a", "--json", str(tmp_path / "o.json"), "--overwrite"],
                capsys)[0] == 0
    assert json.loads((tmp_path / "o.json").read_text())[0]["prompt"] == "<grounding>a"
    rc, err = call(predict.main, base + ["--json", str(tmp_path)], capsys)
    assert rc == 2
    assert_one_line(err, "--json", "is a folder")


# --- grit.build and data.build ---------------------------------------------------------------------
def _grit_input(root):
    (root / "images").mkdir(parents=True)
    with open(root / "captions.jsonl", "w") as f, open(root / "det.jsonl", "w") as d:
        for i, caption in enumerate(["a dog in a field", "a cat on a couch", "a red boat on a lake"]):
            Image.new("RGB", (96, 64), (30, 120, 200)).save(root / "images" / f"k{i}.jpg")
            f.write(json.dumps({"key": f"k{i}", "caption": caption}) + "\n")
            phrases = [p for p in ("a dog", "a field", "a cat", "a couch", "a red boat", "a lake") if p in caption]
            d.write(json.dumps({"key": f"k{i}", "detections": {p: [[0.1, 0.1, 0.6, 0.7, 0.9]] for p in phrases}}) + "\n")
    return root


def _grit_args(src, out, *extra):
    return ["--input", str(src / "captions.jsonl"), "--out", str(out), "--detector", "precomputed",
            "--detector_path", str(src / "det.jsonl"), "--runner", "local", *map(str, extra)]


def test_grit_build_never_mixes_two_builds(tmp_path, capsys):
    from kosmos2_jax.data.build import build
    from kosmos2_jax.grit.build import main
    from kosmos2_jax.grit.records import read_records

    src = _grit_input(tmp_path / "in")
    out = tmp_path / "out"
    assert main(_grit_args(src, out, "--shard_size", 1)) == 0
    before = snapshot(out)
    rc, err = call(main, _grit_args(src, out, "--shard_size", 2), capsys)
    assert rc == 2 and snapshot(out) == before
    assert_one_line(err, "--overwrite")
    assert main(_grit_args(src, out, "--shard_size", 2, "--overwrite")) == 0
    shards = [f for f in os.listdir(out) if f.endswith(".parquet")]
    assert len(shards) == 2 and len(read_records(str(out))) == 3  # replaced, not merged
    assert json.loads((out / "stats.json").read_text())["written"] == 3
    build("data/grit", str(tmp_path / "tfds"), manual_dir=str(out))  # no "two examples share a key"
    with open(src / "captions.jsonl", "a") as f:
        f.write('{"key": "k9", "caption": \n')
    rc, err = call(main, _grit_args(src, tmp_path / "o2"), capsys)
    assert rc == 2 and not os.path.exists(tmp_path / "o2")
    assert_one_line(err, f"{src / 'captions.jsonl'}:4")


def test_grit_build_killed_mid_write_keeps_the_previous_output(tmp_path):
    from kosmos2_jax.grit.records import read_records

    src = _grit_input(tmp_path / "in")
    out = tmp_path / "out"
    first = run_cli("kosmos2_jax.grit.build", *_grit_args(src, out))
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(out)
    kill_at_commit("kosmos2_jax.grit.build", *_grit_args(src, out, "--score_threshold", 0.95, "--overwrite"))
    assert snapshot(out) == before and len(read_records(str(out))) == 3
    again = run_cli("kosmos2_jax.grit.build", *_grit_args(src, out, "--score_threshold", 0.95, "--overwrite"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "stats.json").read_text())["written"] == 0 and not os.path.exists(f"{out}.partial")


def test_data_build_user_errors(tmp_path, capsys):
    from kosmos2_jax.data.build import main

    rc, err = call(main, ["data/grit", "--data_dir", str(tmp_path / "d")], capsys)
    assert rc == 2
    assert_one_line(err, "--manual_dir")
    rc, err = call(main, ["data/nope", "--data_dir", str(tmp_path / "d")], capsys)
    assert rc == 2
    assert_one_line(err, "data/nope")
    rc, err = call(main, ["data/shapes", "--data_dir", str(tmp_path / "d"), "--config", "nope"], capsys)
    assert rc == 2
    assert_one_line(err, "--config 'nope'")
    assert not os.path.exists(tmp_path / "d")


# --- every numeric argument of every CLI ----------------------------------------------------------
def _numeric_arguments(parser):
    for action in parser._actions:
        if getattr(action.type, "__name__", "") in ("integer", "number"):
            yield action


def _cli_cases(ckpts, small_spm, shapes_tfds, image, run_dir, tmp_path):
    from kosmos2_jax import evaluate, export, predict
    from kosmos2_jax import tokenizer
    from kosmos2_jax.grit import build as grit_build

    src = _grit_input(tmp_path / "grit_in")
    caps = tmp_path / "captions.txt"
    caps.write_text("a red circle\n" * 50)
    return {
        "predict": (predict.main, predict.parse_args, ["--checkpoint", ckpts["first"], "--tokenizer", small_spm,
                                                       "--image", image, "--json", str(tmp_path / "p.json")]),
        "evaluate": (evaluate.main, evaluate.parse_args, _eval_args(ckpts["first"], small_spm, shapes_tfds,
                                                                    tmp_path / "ev.json")),
        "export": (export.main, None, ["--workdir", str(run_dir), "--out", str(tmp_path / "ex")]),
        "grit.build": (grit_build.main, lambda a: grit_build.parse_args(a)[0], _grit_args(src, tmp_path / "go")),
        "tokenizer": (tokenizer.main, None, ["train", "--input", str(caps), "--vocab_size", "64",
                                             "--out", str(tmp_path / "spm" / "x")]),
    }


NUMERIC = {"predict": ["--num_beams", "--max_new_tokens", "--no_repeat_ngram_size", "--tokens_per_call",
                       "--batch_size", "--prompt_tokens"],
           "evaluate": ["--max_examples", "--batch_size", "--shots", "--draw", "--num_processes", "--process_id",
                        "--tokens_per_call"],
           "export": ["--step"],
           "grit.build": ["--min_detector_score", "--dask_workers", "--batch_size", "--shard_size", "--nms_iou",
                          "--score_threshold"],
           "tokenizer": ["--vocab_size"]}


def test_every_numeric_argument_of_every_cli_is_checked_first(ckpts, small_spm, shapes_tfds, image, run_dir,
                                                              tmp_path, capsys, monkeypatch):
    """Each numeric argument of each CLI, given values out of its range or not numbers: exit code
    2, one line naming the argument, nothing on disk changed (before any model or data is loaded)."""
    from kosmos2_jax.utils import cli

    cases = _cli_cases(ckpts, small_spm, shapes_tfds, image, run_dir, tmp_path)
    watched = [tmp_path, run_dir, ckpts["first"]]
    before = snapshot(*watched)
    for name, (main, _, base) in cases.items():
        for flag in NUMERIC[name]:
            for value in ["x", "nan", "-99999", "1.5"]:
                argv = list(base)
                if flag in argv:
                    argv[argv.index(flag) + 1] = value
                else:
                    argv += [flag, value]
                rc, err = call(main, argv, capsys)
                assert rc == 2, (name, flag, value, err)
                assert_one_line(err, f"argument {flag}")
    assert snapshot(*watched) == before
    # NUMERIC lists every numeric argument each parser has
    real = cli.ArgumentParser.parse_known_args
    for name, (_, parse, base) in cases.items():
        if parse is None:
            continue
        seen = set()

        def spy(self, *args, **kwargs):
            seen.update(a.option_strings[0] for a in _numeric_arguments(self))
            return real(self, *args, **kwargs)
        monkeypatch.setattr(cli.ArgumentParser, "parse_known_args", spy)
        parse(base)
        monkeypatch.setattr(cli.ArgumentParser, "parse_known_args", real)
        assert seen == set(NUMERIC[name]), (name, seen)


def test_help_shows_defaults(capsys):
    from kosmos2_jax import evaluate, predict

    for main in (predict.main, evaluate.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        assert "(default: " in capsys.readouterr().out


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    """`cli.run` (every command, and the train CLI's launcher): a `UsageError` becomes one line and
    exit 2; a plain `ValueError` (raised inside NumPy or JAX by a forker's bug, say) propagates."""
    from kosmos2_jax.utils import cli
    from kosmos2_jax.utils.errors import UsageError

    def bad_input():
        raise UsageError("--max_new_tokens 0: must be >= 1")

    assert cli.run(bad_input) == 2
    assert capsys.readouterr().err == "error: --max_new_tokens 0: must be >= 1\n"

    def bug():
        np.zeros(3).reshape(2, 2)

    with pytest.raises(ValueError, match="cannot reshape"):
        cli.run(bug)
    assert capsys.readouterr().err == ""


def test_data_build_refuses_another_manual_dir_and_rebuilds_with_overwrite(tmp_path):
    src = tmp_path / "records"
    shutil.copytree(REPO / "data" / "grit" / "dummy_data", src)
    tfds_dir = tmp_path / "tfds"
    first = run_cli("kosmos2_jax.data.build", "data/grit", "--data_dir", tfds_dir, "--manual_dir", src)
    assert first.returncode == 0, first.stderr[-2000:]
    count = int(first.stdout.split("train: ")[1].split()[0])
    lines = (src / "records.jsonl").read_text().splitlines(keepends=True)
    (src / "records.jsonl").write_text("".join(lines[:4]))  # other local files: fewer records
    before = snapshot(tfds_dir)
    again = run_cli("kosmos2_jax.data.build", "data/grit", "--data_dir", tfds_dir, "--manual_dir", src)
    assert again.returncode == 2 and snapshot(tfds_dir) == before
    assert_one_line(again.stderr, "built from other input", "manual_dir", "--overwrite")
    rebuilt = run_cli("kosmos2_jax.data.build", "data/grit", "--data_dir", tfds_dir, "--manual_dir", src, "--overwrite")
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert int(rebuilt.stdout.split("train: ")[1].split()[0]) < count
    same = run_cli("kosmos2_jax.data.build", "data/grit", "--data_dir", tfds_dir, "--manual_dir", src)
    assert same.returncode == 0 and "Downloading and preparing" not in same.stdout  # the same input: kept
    assert same.stdout.split("train: ")[1] == rebuilt.stdout.split("train: ")[1]


def test_a_training_workdir_given_as_a_model_names_its_export(run_dir, small_spm, shapes_tfds, tmp_path, capsys):
    from kosmos2_jax import evaluate, predict

    image = tmp_path / "i.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    rc, err = call(predict.main, ["--checkpoint", str(run_dir), "--tokenizer", small_spm, "--image", str(image)], capsys)
    assert rc == 2
    assert_one_line(err, "is a training workdir", str(run_dir / "export"))
    rc, err = call(evaluate.main, _eval_args(str(run_dir), small_spm, shapes_tfds, tmp_path / "r.json"), capsys)
    assert rc == 2
    assert_one_line(err, "is a training workdir")


def test_evaluate_on_the_grounded_dataset_names_refexp(ckpts, small_spm, shapes_tfds, tmp_path, capsys):
    from kosmos2_jax import evaluate

    args = _eval_args(ckpts["first"], small_spm, shapes_tfds, tmp_path / "r.json")
    args[args.index("--data_dir") + 1] = str(shapes_tfds / "shapes" / "grounded" / "1.0.0")
    rc, err = call(evaluate.main, args, capsys)
    assert rc == 2 and not (tmp_path / "r.json").exists()
    assert_one_line(err, "'grounded'", "refexp")
    args = _eval_args(ckpts["first"], small_spm, shapes_tfds, tmp_path / "r.json", "--split", "tset")
    rc, err = call(evaluate.main, args, capsys)
    assert rc == 2
    assert_one_line(err, "--split 'tset'", "test")


def test_ctrl_c_in_evaluate_is_one_line_and_keeps_the_predictions(ckpts, small_spm, shapes_tfds, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "kosmos2_jax.evaluate",
                             *_eval_args(ckpts["first"], small_spm, shapes_tfds, out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(ENV, KOSMOS2_TEST_PAUSE_BEFORE_COMMIT="60"),
                            # as from a terminal: a suite started in the background (`make test &`)
                            # passes SIGINT on ignored, and Python then keeps ignoring it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("about to commit"):  # the predictions are streamed, the results not yet written
            proc.send_signal(signal.SIGINT)
            break
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read()
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)"), err
    assert not out.exists() and len(out.with_suffix(".predictions.jsonl").read_text().splitlines()) == 4
    again = run_cli("kosmos2_jax.evaluate", *_eval_args(ckpts["first"], small_spm, shapes_tfds, out))
    assert again.returncode == 0 and "resuming: 3 of 3" in again.stderr, again.stderr[-2000:]
