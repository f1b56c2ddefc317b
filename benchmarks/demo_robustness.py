"""The demo recipe (`experiments/shapes_tiny.py`) with several seeds: held-out first-box accuracy,
time and learning curve of each run. A seed changes the init and the data order, which stands in
for another machine's arithmetic (XLA:CPU picks other kernels on other CPUs).

    make demo-data                     # the demo's tokenizer and datasets (what `make demo` builds first)
    .venv/bin/python benchmarks/demo_robustness.py [--seeds 0 1 2] [--workdir workdir/robustness] [--parallel 1]
    make demo-data DEMO_DATA=workdir/demo_data48 SHAPES_NUM_TRAIN=48000    # another dataset size, then
    .venv/bin/python benchmarks/demo_robustness.py --seeds 0 --data workdir/demo_data48

Each run: `python -m kosmos2_jax.train --config experiments/shapes_tiny.py --config.seed=S` (its
log written to WORKDIR/seed_S.train.log as it runs), then `python -m kosmos2_jax.evaluate --task
shapes` on the held-out `refexp` test split, as `make demo` does. Prints one row per seed
(accuracy, train and eval wall time, grounding accuracy at each periodic evaluation) and the
median. `--parallel N` runs N seeds at once (their times then share the cores: compare times only
between runs made the same way).
"""

import argparse
import concurrent.futures
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

from kosmos2_jax.train import presets

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / presets.DEMO_DATA
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


def run_seed(seed: int, workdir: pathlib.Path, overrides=(), data: pathlib.Path = DATA) -> dict:
    run, log = workdir / f"seed_{seed}", workdir / f"seed_{seed}.train.log"
    demo = presets.demo_data(data)
    start = time.time()
    with open(log, "w") as out:  # written as it runs: `tail -f` it to follow a run
        train = subprocess.run([sys.executable, "-m", "kosmos2_jax.train", "--config",
                                f"experiments/shapes_tiny.py:data={data}", "--workdir", str(run), f"--config.seed={seed}",
                                *overrides], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=ENV)
    if train.returncode:
        raise SystemExit(f"seed {seed}: training failed (see {log})")
    trained = time.time()
    evaluated = subprocess.run([sys.executable, "-m", "kosmos2_jax.evaluate", "--task", "shapes", "--checkpoint",
                                str(run / "export"), "--tokenizer", demo["tokenizer"],
                                "--data_dir", demo["refexp"], "--split", "test",
                                "--out", str(run / "eval" / "results.json"), "--overwrite"],
                               capture_output=True, text=True, cwd=REPO, env=ENV)
    if evaluated.returncode:
        raise SystemExit(f"seed {seed}: evaluation failed: {evaluated.stderr[-2000:]}")
    result = json.loads((run / "eval" / "results.json").read_text())
    curve = [(int(m.group(1)), float(m.group(2))) for m in
             re.finditer(r"step (\d+) eval grounding: accuracy ([\d.]+)", log.read_text())]
    return {"seed": seed, "accuracy": result["accuracy"], "scored": result["scored"], "curve": curve,
            "train_s": trained - start, "eval_s": time.time() - trained}


def last_third_spread(curve, steps: int) -> float:
    """max - min of the grounding accuracy (points) at the evaluations in the last third of the steps."""
    tail = [acc for step, acc in curve if step >= steps * 2 / 3]
    return max(tail) - min(tail) if tail else float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    features = [name for flag, name in (("avx512f", "AVX-512"), ("amx_tile", "AMX")) if flag in flags]
    return (f"{names[0]}, {len(names)} logical CPUs, {' and '.join(features) or 'no AVX-512/AMX'}"
            if names else "unknown CPU")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default=str(REPO / "workdir" / "robustness"), help="runs go to WORKDIR/seed_S")
    p.add_argument("--parallel", type=int, default=1, help="seeds trained at once")
    p.add_argument("--override", action="append", default=[],
                   help="a train flag for every run, e.g. --override=--config.train.steps=50 (a quick check)")
    p.add_argument("--data", default=str(DATA),
                   help="the demo's tokenizer and datasets (`make demo-data DEMO_DATA=DIR`)")
    args = p.parse_args(argv)
    data = pathlib.Path(args.data).resolve()  # the runs start in the repository
    demo = presets.demo_data(data)
    built = [pathlib.Path(demo[name], "dataset_info.json") for name in ("grounded", "refexp")]
    if not pathlib.Path(demo["tokenizer"]).is_file() or not all(f.is_file() for f in built):
        make = "make demo-data" + ("" if data == DATA.resolve() else f" DEMO_DATA={data}")
        print(f"error: the demo data is not in {data}: run `{make}` first", file=sys.stderr)
        return 2
    workdir = pathlib.Path(args.workdir)
    existing = [s for s in args.seeds if (workdir / f"seed_{s}").exists()]
    if existing:
        print(f"error: {workdir} already holds runs of seeds {existing}: give another --workdir", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max(args.parallel, 1)) as pool:
        rows = list(pool.map(lambda s: run_seed(s, workdir, args.override, data), args.seeds))
    steps = max((step for r in rows for step, _ in r["curve"]), default=0)
    print(f"machine: {cpu_model()}")
    print("| seed | first-box accuracy (%) | items | train | eval | grounding accuracy during training (step: %) "
          "| spread over the last third (points) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        curve = ", ".join(f"{step}: {acc:.1f}" for step, acc in r["curve"])
        print(f"| {r['seed']} | {r['accuracy']:.1f} | {r['scored']} | {r['train_s'] / 60:.1f} min | "
              f"{r['eval_s']:.0f} s | {curve} | {last_third_spread(r['curve'], steps):.1f} |")
    accs = [r["accuracy"] for r in rows]
    print(f"median {statistics.median(accs):.1f}%, min {min(accs):.1f}%, max {max(accs):.1f}% "
          f"over {len(rows)} seeds (parallel={args.parallel})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
