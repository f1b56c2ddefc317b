"""GRIT build throughput on the `kosmos2` detector (a random tiny model): images/s of the whole build
with 1 and 2 Dask workers and with the local loop, and where one process's time goes.

    .venv/bin/python benchmarks/grit_build.py [--images 400] [--shards 8] [--batch_size 16]

Inputs: shapes images (128 px PNG) with their captions. (1) In this process, every shard through
`engine.build_shard` with stage timings: read (records and image files), decode (image checks and
decoding), text (spaCy, chunks, expressions), detect (the detector's batched forward passes),
select (NMS, threshold, records), write (images and Parquet). (2) `grit.build` as users run it:
`--runner local`, then `--runner dask --dask_workers 1` and `2` (each worker loads spaCy and the
detector once; the wall time includes the cluster's start-up).
"""

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_checkpoint(directory, spm: str) -> str:
    """A random `tiny` KOSMOS-2 with this tokenizer's vocabulary, saved as a params checkpoint."""
    import jax
    import numpy as np

    from kosmos2_jax import weights
    from kosmos2_jax.models import Kosmos2, tiny
    from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer

    model = Kosmos2(tiny(vocab_size=Kosmos2Tokenizer.from_file(spm).vocab_size))
    q = model.config.latent_query_num
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 3), np.float32), np.ones((1, q + 3), np.int32),
                        None, np.pad(np.ones((1, q), np.int32), ((0, 0), (2, 1))))["params"]
    weights.save_checkpoint(str(directory), model.config, params)
    return str(directory)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=16)
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from kosmos2_jax.format import tokenizer
    from kosmos2_jax.data.synthetic import make_example
    from kosmos2_jax.grit.abstract import ABSTRACT_LEMMAS
    from kosmos2_jax.grit.engine import BuildSpec, DetectorSpec, build_shard, plan
    from kosmos2_jax.grit.stages import GritConfig

    tmp = pathlib.Path(tempfile.mkdtemp())
    (tmp / "in" / "images").mkdir(parents=True)
    captions = []
    with open(tmp / "in" / "captions.jsonl", "w") as f:
        for i in range(args.images):
            record = make_example(3, "test", i)
            (tmp / "in" / "images" / f"k{i:05d}.png").write_bytes(record["image"])
            f.write(json.dumps({"key": f"k{i:05d}", "caption": record["caption"]}) + "\n")
            captions.append(record["caption"])
    (tmp / "captions.txt").write_text("\n".join(captions * 5) + "\n")
    spm = tokenizer.train_sentencepiece(str(tmp / "captions.txt"), 300, str(tmp / "spm"))
    ckpt = tiny_checkpoint(tmp / "ckpt", spm)
    shard_size = -(-args.images // args.shards)

    # (1) one process, stage by stage
    detector = DetectorSpec("kosmos2", str(ckpt), spm, batch_size=args.batch_size)
    spec = BuildSpec(str(tmp / "staged"), str(tmp / "in" / "images"), GritConfig(abstract_lemmas=ABSTRACT_LEMMAS),
                     detector, batch_size=args.batch_size)
    shards, _ = plan([str(tmp / "in" / "captions.jsonl")], shard_size)
    build_shard(spec, shards[0])  # loads spaCy and the detector, compiles
    timings = collections.Counter()
    start = time.perf_counter()
    for shard in shards[1:]:
        build_shard(spec, shard, timings)
    wall = time.perf_counter() - start
    images = sum(s.stop - s.start for s in shards[1:])
    print(f"{args.images} shapes images (128 px), {len(shards)} shards, batch {args.batch_size}, tiny kosmos2 "
          f"detector, {os.cpu_count()} cores")
    print(f"one process, warm (shards 2-{len(shards)}): {images / wall:.1f} images/s")
    print("| stage | s | share |")
    print("|---|---|---|")
    for stage in ("read", "decode", "text", "detect", "select", "write"):
        print(f"| {stage} | {timings[stage]:.2f} | {timings[stage] / wall:.0%} |")

    # (2) the CLI, cold (start-up, model loading and compilation included)
    print("| runner | wall (s) | images/s |")
    print("|---|---|---|")
    for name, extra in (("local", ["--runner", "local"]), ("dask, 1 worker", ["--runner", "dask", "--dask_workers", "1"]),
                        ("dask, 2 workers", ["--runner", "dask", "--dask_workers", "2"])):
        out = tmp / f"out_{len(extra)}_{extra[-1]}"
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "kosmos2_jax.grit.build", "--input", str(tmp / "in" / "captions.jsonl"),
                              "--out", str(out), "--detector", "kosmos2", "--detector_path", str(ckpt), "--tokenizer", spm,
                              "--batch_size", str(args.batch_size), "--shard_size", str(shard_size), "--no_compilation_cache",
                              *extra], capture_output=True, text=True, cwd=REPO)
        seconds = time.perf_counter() - t
        if run.returncode:
            sys.exit(run.stderr[-3000:])
        print(f"| {name} | {seconds:.1f} | {args.images / seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
