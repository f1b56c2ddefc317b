"""Ablations as one command: a grid of config overrides x seeds, each an ordinary `train` run,
tabulated and plotted (`train/ablation.py`).

    python -m kosmos2_jax.ablate --config experiments/shapes_tiny.py --workdir workdir/ablate \\
        --sweep optim.lr=1e-3,3e-3 --sweep model.text.dropout=0.0,0.1 --seeds 0 1 2 [--set train.steps=500] \\
        [--parallel 2] [--eval "shapes --data_dir DIR --split test"] [--print_commands]
    python -m kosmos2_jax.ablate table workdir/ablate        # runs made anywhere (a pod, a scheduler)

Runs go to ROOT/<variant>/seed_<s>/ (the baseline, the config as it is, first); a finished run is
skipped, a killed one resumes. Writes ROOT/results.md, ROOT/results.json and ROOT/curves_*.png.
"""

from __future__ import annotations

import os
import sys


def parse_args(argv):
    from kosmos2_jax.utils import cli

    if argv and argv[0] == "table":
        p = cli.ArgumentParser(prog="python -m kosmos2_jax.ablate table",
                               description="tabulate an ablation's runs from their metrics.jsonl")
        p.add_argument("root", help="the ablation's --workdir (holds ablation.json)")
        p.add_argument("--no_plots", action="store_true", help="write no curves_*.png")
        args = p.parse_args(argv[1:])
        args.command = "table"
        return args
    p = cli.ArgumentParser(prog="python -m kosmos2_jax.ablate",
                           description="ablations as one command: a grid of config overrides x seeds, each an "
                                       "ordinary train run (then evaluate), tabulated and plotted")
    p.add_argument("--config", required=True, help="the train config, FILE[:ARG] as `train --config` takes it")
    p.add_argument("--workdir", required=True, help="the ablation's folder: a run per variant and seed, the report")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values (repeat: the grid is the product of the sweeps)")
    p.add_argument("--sweep_name", default="", help="a sweep the config file declares in sweeps() (added to --sweep)")
    p.add_argument("--seeds", type=cli.integer(0), nargs="+", default=[0], help="each variant runs with each seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override every run takes, baseline included (repeat)")
    p.add_argument("--parallel", type=cli.integer(1), default=1, help="runs at once (they share the machine)")
    p.add_argument("--eval", action="append", default=[], metavar='"TASK [FLAGS]"',
                   help="after each run: `evaluate --task TASK FLAGS` on its export (repeat); the results join "
                        "the table")
    p.add_argument("--print_commands", action="store_true",
                   help="print each run's train command (for a scheduler or a pod: add the distributed flags) "
                        "and record the plan for `ablate table`; train nothing")
    p.add_argument("--no_plots", action="store_true", help="write no curves_*.png")
    args = p.parse_args(argv)
    args.command = "run"
    return args


def main(argv=None) -> int:
    from kosmos2_jax.utils import cli

    args = parse_args(sys.argv[1:] if argv is None else argv)
    return cli.run(lambda: ablate(args))


def ablate(args) -> int:
    from kosmos2_jax.train import ablation

    if args.command == "table":
        if not os.path.isfile(os.path.join(args.root, ablation.PLAN_FILE)):
            raise FileNotFoundError(f"{args.root}: no {ablation.PLAN_FILE} (not an ablation's --workdir)")
        ablation.tabulate(args.root, plots=not args.no_plots)
        return 0
    sweeps = [ablation.parse_assignment(s, "--sweep") for s in args.sweep]
    if args.sweep_name:
        sweeps += ablation.sweep_named(args.config, args.sweep_name)
    fixed = []
    for item in args.set:
        key, values = ablation.parse_assignment(item, "--set")
        fixed.append((key, ",".join(values)))  # a tuple value keeps its commas
    plan = ablation.make_plan(args.config, sweeps, args.seeds, fixed)
    runs = ablation.check_plan(plan)  # every config built and checked before anything runs
    variants = len({r.variant for r in runs})
    print(f"{len(runs)} runs: {variants} variants x {len(args.seeds)} seeds, in {args.workdir}", flush=True)
    ablation.record_plan(plan, args.workdir, runs)
    if args.print_commands:
        for line in ablation.print_commands(plan, args.workdir, runs):
            print(line)
        return 0
    ablation.run_plan(plan, args.workdir, runs, args.parallel, args.eval,
                      say=lambda m: print(m, flush=True))
    ablation.tabulate(args.workdir, plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
