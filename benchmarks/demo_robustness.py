"""The demo recipe (`experiments/shapes_tiny.py`) with several seeds: held-out first-box accuracy,
time and learning curve of each run. A seed changes the init and the data order, which stands in
for another machine's arithmetic (XLA:CPU picks other kernels on other CPUs).

    make demo-data                     # the demo's tokenizer and datasets (what `make demo` builds first)
    .venv/bin/python benchmarks/demo_robustness.py [--seeds 0 1 2] [--workdir workdir/robustness] [--parallel 1]
    make demo-data DEMO_DATA=workdir/demo_data48 SHAPES_NUM_TRAIN=48000    # another dataset size, then
    .venv/bin/python benchmarks/demo_robustness.py --seeds 0 --data workdir/demo_data48

The seeds are one `python -m kosmos2_jax.ablate` grid (`train/ablation.py`): each run is `python
-m kosmos2_jax.train --config experiments/shapes_tiny.py --config.seed=S` in WORKDIR/baseline/seed_S
(its log in train.log there as it runs), then `python -m kosmos2_jax.evaluate --task shapes` on the
held-out `refexp` test split, as `make demo` does; `ablate table WORKDIR` tabulates the same runs
(losses, step time). Prints one row per seed
(accuracy, train and eval wall time, grounding accuracy at each periodic evaluation) and the
median. `--parallel N` runs N seeds at once (their times then share the cores: compare times only
between runs made the same way).
"""

import argparse
import json
import os
import pathlib
import statistics
import sys

from kosmos2_jax.train import presets

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / presets.DEMO_DATA
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


def run_seeds(seeds, workdir: pathlib.Path, overrides=(), data: pathlib.Path = DATA, parallel: int = 1) -> list[dict]:
    """The seeds as one `kosmos2_jax.ablate` grid (the recipe, no sweep), each run evaluated on the
    held-out test split as `make demo` does; -> a row per seed."""
    from kosmos2_jax.train import ablation, metrics_log

    demo = presets.demo_data(data)
    fixed = []
    for flag in overrides:
        key, _, value = flag.removeprefix("--config.").partition("=")
        fixed.append((key, value))
    plan = ablation.make_plan(f"experiments/shapes_tiny.py:data={data}", seeds=seeds, fixed=fixed)
    runs = ablation.check_plan(plan)
    ablation.record_plan(plan, str(workdir), runs)
    ablation.run_plan(plan, str(workdir), runs, parallel, [f"shapes --data_dir {demo['refexp']} --split test"],
                      env=ENV)
    rows = []
    for run in runs:
        folder = workdir / run.name
        result = json.loads((folder / "eval" / "shapes.json").read_text())
        record = json.loads((folder / ablation.RUN_FILE).read_text())
        curve = [(r["step"], r["accuracy"]) for r in metrics_log.read(str(folder)) if r["kind"] == "eval/grounding"]
        rows.append({"seed": run.seed, "accuracy": result["accuracy"], "scored": result["scored"], "curve": curve,
                     "train_s": record.get("train_s", float("nan")), "eval_s": record.get("eval_s", float("nan")),
                     "log": folder / "train.log"})
    return rows


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
    p.add_argument("--workdir", default=str(REPO / "workdir" / "robustness"),
                   help="an ablation folder: runs go to WORKDIR/baseline/seed_S (a finished seed is kept, a killed "
                        "one resumes)")
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
    os.chdir(REPO)  # the config path is the repository's
    rows = run_seeds(args.seeds, pathlib.Path(args.workdir).resolve(), args.override, data, args.parallel)
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
