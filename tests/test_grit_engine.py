"""GRIT builds at scale: a Dask cluster, restarts after a kill, no download by the default
runners, and the paper's sources' metadata (COYO-700M, LAION-2B) read as published."""

import json
import os
import socket
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO
from test_grit import _make_input, nlp  # noqa: F401 (nlp: the fixture)
from test_safety import kill_at_line

pytestmark = pytest.mark.filterwarnings("ignore")


def _args(src, out, *extra):
    return ["--input", str(src / "captions.jsonl"), "--out", str(out), "--detector", "precomputed",
            "--detector_path", str(src / "detections.jsonl"), "--batch_size", "2", *map(str, extra)]


def _result(out):
    from kosmos2_jax.grit.records import read_records

    return read_records(str(out)), json.loads((out / "stats.json").read_text()), sorted(os.listdir(out / "images"))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _make_input(tmp_path_factory.mktemp("grit_in"))


@pytest.fixture(scope="module")
def local_build(src, tmp_path_factory, nlp):
    from kosmos2_jax.grit.build import main

    out = tmp_path_factory.mktemp("local") / "out"
    assert main(_args(src, out, "--runner", "local", "--shard_size", 3)) == 0
    return _result(out)


def test_a_dask_cluster_of_two_workers_builds_what_the_local_loop_builds(src, local_build, tmp_path):
    """Beam's DaskRunner on a dask.distributed LocalCluster with 2 worker processes."""
    pytest.importorskip("distributed")
    run = subprocess.run([sys.executable, "-m", "kosmos2_jax.grit.build", *_args(src, tmp_path / "out", "--runner", "dask",
                                                                              "--dask_workers", 2, "--shard_size", 3)],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 shards: 0 finished earlier (skipped), 4 to build on dask" in run.stderr
    assert _result(tmp_path / "out") == local_build
    manifest = json.loads((tmp_path / "out" / "build.json").read_text())
    assert manifest["shard_size"] == 3 and len(manifest["inputs"]) == 1


def test_a_build_killed_between_shards_resumes_without_redoing_them(src, local_build, tmp_path):
    out = tmp_path / "out"
    args = _args(src, out, "--runner", "local", "--shard_size", 3)
    # the build pauses after each shard: killed in the pause after the first
    kill_at_line("kosmos2_jax.grit.build", "shard 1/4 done", {"KOSMOS2_TEST_PAUSE_AFTER_SHARD": "60"}, *args)
    partial = tmp_path / "out.partial"
    assert not out.exists() and sorted(p.name for p in partial.glob("stats-*.json")) == ["stats-00000.json"]
    kept = {p.name: p.stat().st_mtime_ns for p in partial.glob("*-00000.*")}
    assert len(kept) > 1  # the shard's records and its stats
    again = subprocess.run([sys.executable, "-m", "kosmos2_jax.grit.build", *args], capture_output=True, text=True,
                           cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 shards: 1 finished earlier (skipped), 3 to build on local" in again.stderr
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not recomputed
    assert _result(out) == local_build and not partial.exists()


def test_a_restart_with_other_settings_is_refused_naming_them(src, tmp_path, capsys):
    from kosmos2_jax.grit.build import main

    out = tmp_path / "out"
    assert main(_args(src, out, "--runner", "local", "--shard_size", 3)) == 0
    assert main(_args(src, out, "--runner", "local", "--shard_size", 3)) == 0  # the same: nothing to do
    assert "already built with these settings" in capsys.readouterr().err
    assert main(_args(src, out, "--runner", "local", "--shard_size", 3, "--score_threshold", 0.9)) == 2
    err = capsys.readouterr().err
    assert "score_threshold: 0.65 -> 0.9" in err and "--overwrite" in err


def test_the_direct_runner_never_tries_a_download(src, local_build, tmp_path, monkeypatch):
    """Beam's DirectRunner would first try the Prism runner (a binary it downloads); ours runs
    in-process, with no connection attempted to anything but this machine."""
    from apache_beam.runners.portability import prism_runner

    from kosmos2_jax.grit.build import main

    def no_prism(*args, **kwargs):
        raise AssertionError("the Prism runner was tried")

    real_connect = socket.socket.connect

    def local_only(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
            raise AssertionError(f"a connection to {address!r} was attempted")
        return real_connect(self, address)

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", no_prism)
    monkeypatch.setattr(socket.socket, "connect", local_only)
    out = tmp_path / "out"
    assert main(_args(src, out, "--runner", "DirectRunner", "--shard_size", 3)) == 0
    assert _result(out) == local_build


def test_coyo_and_laion_metadata_as_published(nlp, tmp_path):
    """COYO-700M (`id, url, text, width, height, ...`) and LAION-2B (`URL, TEXT, WIDTH, HEIGHT, hash,
    ...`) Parquet, their images in a folder named by the key column: records end to end."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kosmos2_jax.grit.build import main
    from kosmos2_jax.grit.records import read_records

    images = tmp_path / "images"
    images.mkdir()
    coyo = {"id": [4470, 4471], "url": ["http://x/1.jpg", "http://x/2.jpg"],
            "text": ["a dog in a field of flowers", "a cat and a dog on a couch"], "width": [96, 96],
            "height": [64, 64], "image_phash": ["a", "b"], "clip_similarity_vitl14": [0.3, 0.3]}
    laion = {"URL": ["http://y/1.jpg"], "TEXT": ["a dog in a field of flowers"], "WIDTH": [96], "HEIGHT": [64],
             "similarity": [0.31], "hash": [-8411], "punsafe": [0.01], "pwatermark": [0.1]}
    for key in ("4470", "4471", "-8411"):
        Image.new("RGB", (96, 64), (30, 120, 200)).save(images / f"{key}.jpg")
    boxes = {"a dog": [[0.1, 0.2, 0.5, 0.9, 0.9]], "a field": [[0, 0.5, 1, 1, 0.8]], "a cat": [[0, 0, 0.4, 0.4, 0.9]],
             "a couch": [[0, 0.3, 1, 1, 0.9]], "flowers": [[0.6, 0.6, 0.9, 0.9, 0.7]]}
    with open(tmp_path / "detections.jsonl", "w") as f:
        for key in ("4470", "4471", "-8411"):
            f.write(json.dumps({"key": key, "detections": boxes}) + "\n")
    for name, table in (("coyo", coyo), ("laion", laion)):
        (tmp_path / name).mkdir()
        pq.write_table(pa.table(table), tmp_path / name / "part-00000.parquet")
        out = tmp_path / f"out_{name}"
        assert main(["--input", str(tmp_path / name), "--images", str(images), "--out", str(out), "--detector",
                     "precomputed", "--detector_path", str(tmp_path / "detections.jsonl"), "--runner", "local"]) == 0
        records = {r["key"]: r for r in read_records(str(out))}
        keys = ["4470", "4471"] if name == "coyo" else ["-8411"]
        assert sorted(records) == sorted(keys)
        first = records[keys[0]]
        assert first["caption"] == "a dog in a field of flowers" and first["width"] == 96
        assert first["url"].startswith("http://") and first["ref_exps"]
