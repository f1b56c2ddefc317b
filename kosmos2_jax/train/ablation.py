"""Ablations: a grid of config overrides x seeds, each an ordinary `train` run, tabulated.

    plan = make_plan("experiments/shapes_tiny.py", sweeps=[("optim.lr", ["1e-3", "3e-3"])], seeds=[0, 1])
    check_plan(plan)                       # every run's config parsed and checked before any starts
    run_plan(plan, "workdir/ablate")       # ROOT/<variant>/seed_<s>/: train (+ evaluate), resumable
    table = tabulate("workdir/ablate")     # ROOT/results.md, results.json, curves_<metric>.png

A variant is a set of `--config.KEY=VALUE` overrides; the baseline is the config as it is (a grid
point that changes nothing is the baseline). Each run is `python -m kosmos2_jax.train --config CFG
--workdir ROOT/<variant>/seed_<s> --config.seed=S --config.KEY=VALUE ...`, exactly the command a
user would type, so a killed run resumes from its checkpoint and a finished one is skipped. The
plan is recorded in ROOT/ablation.json and each run's overrides in its folder
(`ablation_run.json`); a rerun that would give a folder other overrides is refused.

The numbers come from each run's `metrics.jsonl` (train/loop.py's `Log`: one line per logged
train step, validation and evaluation) and, with `evals`, from `evaluate`'s results file.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

from kosmos2_jax.train import metrics_log
from kosmos2_jax.weights import read_json
from kosmos2_jax.utils import outputs
from kosmos2_jax.utils.errors import UsageError

PLAN_FILE, RUN_FILE = "ablation.json", "ablation_run.json"
BASELINE = "baseline"


@dataclasses.dataclass(frozen=True)
class Run:
    variant: str  # the folder of its variant: "baseline" or the overrides, e.g. "optim.lr=0.001"
    overrides: tuple[tuple[str, str], ...]  # the variant's (KEY, VALUE) pairs, as --config.KEY=VALUE
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}/seed_{self.seed}"

    def train_args(self, plan: dict, root: str) -> list[str]:
        """The `train` command of this run (without the Python executable)."""
        sets = [f"--config.{k}={v}" for k, v in (*plan["set"], *self.overrides)]
        return ["-m", "kosmos2_jax.train", f"--config={plan['config']}", f"--workdir={os.path.join(root, self.name)}",
                f"--config.seed={self.seed}", *sets]


def parse_assignment(text: str, flag: str) -> tuple[str, list[str]]:
    """"KEY=V1,V2" -> (KEY, [V1, V2]); a one-line UsageError naming `flag` otherwise."""
    key, eq, values = text.partition("=")
    key = key.strip().removeprefix("config.")
    items = [v.strip() for v in values.split(",")] if eq else []
    if not key or not items or not all(items) or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
        raise UsageError(f"{flag} {text!r}: give KEY=VALUE[,VALUE...] with KEY a config key, e.g. optim.lr=1e-3,3e-3")
    return key, items


def named_sweeps(config: str) -> dict:
    """The config file's `sweeps()` (beside `get_config`, big_vision-style): {name: {KEY: [values]}}."""
    import importlib.util

    path = config.split(":")[0]
    spec = importlib.util.spec_from_file_location("kosmos2_ablated_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "sweeps"):
        raise UsageError(f"--sweep_name: {path} declares no sweeps() (a function returning {{name: {{KEY: [values]}}}})")
    return module.sweeps()


def sweep_named(config: str, name: str) -> list[tuple[str, list[str]]]:
    table = named_sweeps(config)
    if name not in table:
        raise UsageError(f"--sweep_name {name!r}: {config.split(':')[0]}'s sweeps() has {', '.join(sorted(table))}")
    return [(k, [str(v) for v in values]) for k, values in table[name].items()]


def variant_name(overrides: Sequence[tuple[str, str]]) -> str:
    """A readable folder name: "optim.lr=0.001+model.text.dropout=0.0" (path characters replaced)."""
    if not overrides:
        return BASELINE
    return "+".join(re.sub(r"[^\w.=-]", "_", f"{k}={v}") for k, v in overrides)


def make_plan(config: str, sweeps: Sequence[tuple[str, Sequence[str]]] = (), seeds: Sequence[int] = (0,),
              fixed: Sequence[tuple[str, str]] = ()) -> dict:
    """The grid: the baseline first, then the product of the sweeps, each with every seed.
    `fixed`: overrides every run takes (--set)."""
    keys = [k for k, _ in sweeps]
    if len(set(keys)) != len(keys):
        raise UsageError(f"--sweep: a key is swept twice: {', '.join(sorted({k for k in keys if keys.count(k) > 1}))}")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise UsageError(f"--seeds {list(seeds)}: give distinct seeds")
    variants = [()]
    for combo in itertools.product(*(values for _, values in sweeps)):
        variants.append(tuple(zip(keys, combo)))
    return {"config": config, "set": [list(p) for p in fixed], "seeds": list(seeds),
            "sweeps": [[k, list(v)] for k, v in sweeps],
            "variants": [[list(p) for p in v] for v in dict.fromkeys(variants)]}


def runs_of(plan: dict, baseline_values: dict | None = None) -> list[Run]:
    """The plan's runs in order; with `baseline_values` (the config's value of each swept key), a
    swept value equal to the config's own is left out of the variant's overrides and name, so a
    grid point that changes nothing is the baseline itself, not a second copy of it."""
    variants, seen = [], set()
    for v in plan["variants"]:
        pairs = tuple((k, str(val)) for k, val in v)
        if baseline_values is not None:  # a swept value that is the config's own changes nothing
            pairs = tuple((k, val) for k, val in pairs if not _same_value(baseline_values.get(k), val))
        if pairs not in seen:
            seen.add(pairs)
            variants.append(pairs)
    return [Run(variant_name(v), v, s) for v in variants for s in plan["seeds"]]


def _same_value(current, text: str) -> bool:
    if current is None:
        return False
    try:
        return float(current) == float(text)
    except (TypeError, ValueError):
        return str(current).lower() == text.lower()


def load_config(config: str, overrides: Sequence[tuple[str, str]]):
    """The ConfigDict `train --config CONFIG --config.KEY=VALUE ...` would build (absl's own
    parsing), checked by `config_check` without data; a one-line UsageError naming a bad key or value."""
    from absl import flags
    from ml_collections import config_flags

    from kosmos2_jax.train import config_check, launch

    argv = ["ablate", f"--config={config}", *(f"--config.{k}={v}" for k, v in overrides)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    launch.check_config_files(argv)
    try:
        values(argv)
    except Exception as e:  # absl and ml_collections raise several types for a bad key or value
        raise UsageError(launch.flag_error_message(e, argv)) from None
    cfg = values.config
    config_check.check(cfg, need_tokenizer=False, need_data=False)
    return cfg


def check_plan(plan: dict) -> list[Run]:
    """Every variant's config built and checked before any run starts; -> the runs (a grid point
    equal to the config is the baseline)."""
    fixed = [tuple(p) for p in plan["set"]]
    base = load_config(plan["config"], fixed)
    for variant in plan["variants"]:
        load_config(plan["config"], [*fixed, *(tuple(p) for p in variant)])
    swept = {k: _lookup(base, k) for k, _ in plan["sweeps"]}
    return runs_of(plan, swept)


def _lookup(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def record_plan(plan: dict, root: str, runs: Sequence[Run]) -> None:
    """ROOT/ablation.json (the plan) and each run's ROOT/<run>/ablation_run.json; refuses a run
    folder that already holds a run of other overrides."""
    for run in runs:
        path = os.path.join(root, run.name, RUN_FILE)
        wanted = {"config": plan["config"], "set": plan["set"], "overrides": [list(p) for p in run.overrides],
                  "seed": run.seed}
        if os.path.isfile(path):
            saved = read_json(path, "the run record")
            if {k: saved.get(k) for k in wanted} != wanted:
                raise UsageError(f"{os.path.join(root, run.name)} holds a run of other settings ({_describe(saved)}; "
                                 f"now {_describe(wanted)}): use another --workdir, or the same flags")
    for run in runs:
        path = os.path.join(root, run.name, RUN_FILE)
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            outputs.write_json(path, {"config": plan["config"], "set": plan["set"],
                                      "overrides": [list(p) for p in run.overrides], "seed": run.seed,
                                      "finished": False}, indent=2)
    outputs.write_json(os.path.join(root, PLAN_FILE),
                       dict(plan, runs=[{"name": r.name, "variant": r.variant, "seed": r.seed} for r in runs]), indent=2)


def _describe(record: dict) -> str:
    sets = [f"{k}={v}" for k, v in (*record.get("set", []), *record.get("overrides", []))]
    return f"--config {record.get('config')} seed {record.get('seed')}" + (f" {' '.join(sets)}" if sets else "")


def run_plan(plan: dict, root: str, runs: Sequence[Run], parallel: int = 1, evals: Sequence[str] = (),
             say: Callable[[str], None] = print, env: dict | None = None) -> None:
    """Train (then evaluate) every run not yet finished, `parallel` at a time; each run's console
    output goes to ROOT/<run>/train.log as it runs. A failed run stops the ablation (the others
    already started finish), naming its log."""
    todo = [r for r in runs if not read_json(os.path.join(root, r.name, RUN_FILE), "the run record").get("finished")]
    for r in runs:
        if r not in todo:
            say(f"{r.name}: finished before, skipped")
    env = dict(os.environ if env is None else env)
    done = [len(runs) - len(todo)]

    def one(run: Run) -> None:
        folder = os.path.join(root, run.name)
        start = time.time()
        say(f"[{run.name}] training: {' '.join(run.train_args(plan, root)[2:])}")
        log = os.path.join(folder, "train.log")
        with open(log, "a") as out:
            code = subprocess.run([sys.executable, *run.train_args(plan, root)], stdout=out, stderr=subprocess.STDOUT,
                                  env=env).returncode
        if code:
            raise UsageError(f"{run.name}: train exited with {code}: see {log}")
        trained = time.time()
        for task in evals:
            _evaluate(folder, task, env)
        record = read_json(os.path.join(folder, RUN_FILE), "the run record")
        outputs.write_json(os.path.join(folder, RUN_FILE),
                           dict(record, finished=True, train_s=trained - start, eval_s=time.time() - trained), indent=2)
        done[0] += 1
        say(f"[{run.name}] done in {time.time() - start:.0f} s ({done[0]}/{len(runs)} runs finished)")

    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        jobs = [pool.submit(one, r) for r in todo]
        for job in jobs:
            job.result()


def _evaluate(folder: str, task: str, env: dict) -> None:
    """`evaluate --task NAME [its flags]` on the run's export, its results in RUN/eval/NAME.json."""
    name, *flags = task.split()
    config = read_json(os.path.join(folder, "config.json"), "the run config")
    out = os.path.join(folder, "eval", f"{name}.json")
    cmd = [sys.executable, "-m", "kosmos2_jax.evaluate", "--task", name, "--checkpoint", os.path.join(folder, "export"),
           "--tokenizer", config["tokenizer"], "--out", out, "--overwrite", *flags]
    with open(os.path.join(folder, "eval.log"), "a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        raise UsageError(f"{folder}: evaluate --task {name} exited with {code}: see {os.path.join(folder, 'eval.log')}")


def print_commands(plan: dict, root: str, runs: Sequence[Run], extra: Sequence[str] = ()) -> list[str]:
    """One `train` command per run (with `extra` flags, e.g. a pod's distributed ones)."""
    return [" ".join([sys.executable, *r.train_args(plan, root), *extra]) for r in runs]


# --- the report ---------------------------------------------------------------------------------
def run_summary(folder: str) -> dict:
    """One run's numbers: the last train loss, the last validation loss and metrics, each in-training
    evaluation's last values, post-training evaluations (RUN/eval/*.json), and the median step time
    and tokens/s over its logged lines after the first (which includes compiling)."""
    records = metrics_log.read(folder)
    train = [r for r in records if r["kind"] == "train"]
    out = {}
    if train:
        out["train_loss"] = train[-1]["loss"]
        steady = train[1:] or train
        out["step_time"] = statistics.median(r["step_time"] for r in steady)
        out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
        out["steps"] = train[-1]["step"]
    for r in records:
        if r["kind"] == "val":
            out.update({f"val_{k}": v for k, v in r.items() if k not in ("kind", "step")})
        elif r["kind"].startswith("eval/"):
            out.update({f"{r['kind']}/{k}": v for k, v in r.items() if k not in ("kind", "step")})
    evals = os.path.join(folder, "eval")
    for name in sorted(os.listdir(evals)) if os.path.isdir(evals) else []:
        if name.endswith(".json") and not name.endswith(".predictions.json"):
            result = read_json(os.path.join(evals, name), "the evaluation results")
            out.update({f"evaluate/{name[:-5]}/{k}": v for k, v in result.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _BOOKKEEPING})
    return out


_BOOKKEEPING = ("count", "scored", "missing_images", "items")  # evaluate's item counts, not results


def tabulate(root: str, say: Callable[[str], None] = print, plots: bool = True) -> dict:
    """ROOT/results.json and results.md: a row per variant, each metric as median [min-max] over
    its seeds with the change against the baseline's median; ROOT/curves_<metric>.png. Returns
    the results."""
    plan = read_json(os.path.join(root, PLAN_FILE), "the ablation plan")
    variants: dict[str, list[tuple[int, dict]]] = {}
    for run in plan["runs"]:
        folder = os.path.join(root, run["name"])
        variants.setdefault(run["variant"], []).append((run["seed"], run_summary(folder)))
    metrics = [m for m in _metric_order(variants) if m != "steps"]
    base = variants.get(BASELINE)
    rows = []
    for variant, seeds in variants.items():
        row = {"variant": variant, "seeds": len([s for s, m in seeds if m]), "metrics": {}}
        for metric in metrics:
            values = [m[metric] for _, m in seeds if metric in m]
            if not values:
                continue
            cell = {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
            base_values = [m[metric] for _, m in base or [] if metric in m]
            if base_values and variant != BASELINE:
                cell["change"] = cell["median"] - statistics.median(base_values)
            row["metrics"][metric] = cell
        rows.append(row)
    results = {"config": plan["config"], "set": plan["set"], "seeds": plan["seeds"], "metrics": metrics, "rows": rows}
    outputs.write_json(os.path.join(root, "results.json"), results, indent=2)
    table = markdown_table(results)
    with outputs.atomic_file(os.path.join(root, "results.md")) as f:
        f.write(f"# Ablation of `{plan['config']}`\n\n{table}\n")
    say(table)
    if plots:
        for path in plot_curves(root, plan):
            say(f"wrote {path}")
    return results


def _metric_order(variants) -> list[str]:
    first = ["train_loss", "val_loss"]
    seen = dict.fromkeys(k for seeds in variants.values() for _, m in seeds for k in m)
    last = ["step_time", "tokens_per_s"]
    return [k for k in first if k in seen] + sorted(k for k in seen if k not in first + last) + \
        [k for k in last if k in seen]


def _fmt(x: float) -> str:
    if x == 0 or (1e-3 <= abs(x) < 1e5):
        return f"{x:.4g}"
    return f"{x:.3e}"


def markdown_table(results: dict) -> str:
    """The results as a markdown table: median [min-max] (change against the baseline)."""
    metrics = results["metrics"]
    lines = ["| variant | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for row in results["rows"]:
        cells = []
        for metric in metrics:
            c = row["metrics"].get(metric)
            if c is None:
                cells.append("–")
                continue
            text = _fmt(c["median"]) if c["n"] == 1 else f"{_fmt(c['median'])} [{_fmt(c['min'])}–{_fmt(c['max'])}]"
            if "change" in c:
                text += f" ({'+' if c['change'] >= 0 else '−'}{_fmt(abs(c['change']))})"
            cells.append(text)
        lines.append(f"| {row['variant']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(root: str, plan: dict) -> list[str]:
    """ROOT/curves_<metric>.png for the train loss and each validation metric: a line per variant
    (the median over its seeds at each logged step), the seeds' range as a band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}
    for run in plan["runs"]:
        for r in metrics_log.read(os.path.join(root, run["name"])):
            if r["kind"].startswith("train/source/"):  # a mixture's per-source lines: the table has them
                continue
            keys = ["loss"] if r["kind"] == "train" else [k for k in r if k not in ("kind", "step")]
            for k in keys:
                metric = f"{r['kind'].replace('/', '_')}_{k}"
                if isinstance(r.get(k), (int, float)) and math.isfinite(r[k]):
                    by_step = curves.setdefault(metric, {}).setdefault(run["variant"], {})
                    by_step.setdefault(r["step"], []).append(r[k])
    written = []
    for metric, variants in curves.items():
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        for variant, by_step in variants.items():
            steps = sorted(by_step)
            med = [statistics.median(by_step[s]) for s in steps]
            line, = ax.plot(steps, med, label=variant, lw=1.6)
            if any(len(by_step[s]) > 1 for s in steps):
                ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                                color=line.get_color(), alpha=0.18, lw=0)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        config = os.path.basename(plan["config"].split(":")[0])
        ax.set_title(f"{config}: {metric} (median over seeds, band: min–max)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        safe = re.sub(r"[^\w.-]", "_", metric)
        path = os.path.join(root, f"curves_{safe}.png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
