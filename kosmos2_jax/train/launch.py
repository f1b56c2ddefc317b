"""The train command's flags and entry point, shared by `python -m kosmos2_jax.train` and a forked
train file (`launch(run)` at its end): absl flags (`--config FILE[:ARG]`, `--config.KEY=VALUE`,
`--workdir`, `--compile_only --topology`, `--print_config`, the compilation cache, GPU XLA flags),
one-line errors for bad input (exit 2), tracebacks for everything else."""


from __future__ import annotations

import functools
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from kosmos2_jax.utils import cli
from kosmos2_jax.utils.errors import UsageError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, logs and the export go")
flags.DEFINE_bool("compile_only", False, "compile the train step for --topology and report memory and sharding; "
                  "trains nothing (train/compile_check.py)")
flags.DEFINE_string("topology", "", "with --compile_only: a TPU slice, e.g. v5p-128 or v5p:4x4x8 (needs libtpu)")
flags.DEFINE_integer("num_slices", 1, "with --compile_only: that many slices of --topology joined by the data-center "
                     "network (config.mesh.dcn_data follows)", lower_bound=1)
flags.DEFINE_bool("print_config", False, "print the config (every key --config.KEY=VALUE can set) and exit")
flags.DEFINE_string("compilation_cache", cli.default_compilation_cache(),
                    "persistent XLA compilation cache: a rerun or resume of the same config loads its programs "
                    "instead of compiling them (env KOSMOS2_COMPILATION_CACHE)")
flags.DEFINE_bool("no_compilation_cache", False, "compile afresh and write no cache")
flags.DEFINE_enum("xla_tpu_preset", "auto", ["auto", *cli.TPU_XLA_PRESETS],
                  "libtpu flags (LIBTPU_INIT_ARGS; a flag already set is kept): multislice overlaps the "
                  "data-parallel all-reduce across slices and the in-slice gathers with compute (MaxText's "
                  "multi-slice flags); auto: multislice on TPUs with config.mesh.dcn_data > 1, and for "
                  "--compile_only --num_slices > 1")
flags.DEFINE_enum("xla_gpu_preset", "training", list(cli.GPU_XLA_PRESETS),
                  "on NVIDIA GPUs: XLA flags added to XLA_FLAGS (cli.GPU_XLA_PRESETS: latency-hiding scheduler, "
                  "pipelined and combined collectives); none adds nothing")
flags.mark_flags_as_required(["config"])


def main(argv, run=None, train_step=None):
    """`run(cfg, workdir)`: train/loop.py's, or a fork's (with its `train_step` for --compile_only)."""
    del argv
    logging.set_verbosity(logging.WARNING)  # keep Orbax/tfds INFO lines out of the console log
    from kosmos2_jax.utils.cli import USER_ERRORS

    cli.skip_absent_tpu()
    cli.use_gpu_xla_flags(FLAGS.xla_gpu_preset)  # before JAX starts its backend
    tpu_preset = FLAGS.xla_tpu_preset
    if tpu_preset == "auto":  # several TPU slices (or their compile-only check): overlap the all-reduce
        slices = FLAGS.num_slices if FLAGS.compile_only else FLAGS.config.mesh.dcn_data if cli.tpu_machine() else 1
        tpu_preset = "multislice" if slices > 1 else "none"
    added = cli.use_tpu_xla_flags(tpu_preset)
    if added:
        print(f"LIBTPU_INIT_ARGS += {' '.join(added)} (--xla_tpu_preset {tpu_preset})", flush=True)
    cli.use_compilation_cache(None if FLAGS.no_compilation_cache else FLAGS.compilation_cache,
                              compile_only=FLAGS.compile_only)
    try:
        if FLAGS.print_config:
            print(FLAGS.config)
            return
        if FLAGS.compile_only:
            if not FLAGS.topology:
                raise UsageError("--compile_only needs --topology (e.g. v5p-128 or v5p:4x4x8)")
            from kosmos2_jax.train import config_check
            from kosmos2_jax.train.compile_check import check

            config_check.check(FLAGS.config, need_tokenizer=False, need_data=False)
            check(FLAGS.config, FLAGS.topology, train_step, FLAGS.num_slices)
            return
        if not FLAGS.workdir:
            raise UsageError("--workdir is required (where checkpoints, logs and the export go)")
        if run is None:
            from kosmos2_jax.train.loop import run
        run(FLAGS.config, FLAGS.workdir)
    except USER_ERRORS as e:
        if os.environ.get("KOSMOS2_DEBUG"):
            raise
        from kosmos2_jax.utils.cli import stderr

        print(f"error: {e}", file=stderr(), flush=True)
        sys.stdout.flush()
        # Not sys.exit: after a failed Orbax restore, its event-loop threads print tracebacks at
        # interpreter shutdown.
        os._exit(2)


def parse_flags(argv):
    """absl's flag parsing, with a bad `--config.KEY=VALUE` (an unknown key, a value of the wrong
    type) as one line instead of a traceback."""
    try:
        check_config_files(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        print(f"error: {flag_error_message(e, argv)}", file=sys.stderr)
    sys.exit(2)


def check_config_files(argv) -> None:
    """A UsageError naming a `--config FILE[:ARG]` whose file does not exist."""
    missing = [value for value in _config_values(argv) if not os.path.isfile(value.split(":")[0])]
    if missing:
        raise UsageError(f"--config {missing[0]}: no such file {missing[0].split(':')[0]!r} (the configs: "
                         "experiments/*.py, or your own file defining get_config)")


def flag_error_message(e: Exception, argv) -> str:
    """absl's or ml_collections' error for a bad `--config...` flag as one line naming the flag."""
    if isinstance(e, flags.Error):
        message = str(e)
        if "Traceback (most recent call last)" in message:  # an error inside get_config: its last line
            last = message.strip().splitlines()[-1]
            message = f"{message.split(': Error whilst')[0]}: {last.split(': ', 1)[-1] if 'Error: ' in last else last}"
    else:
        message = str(e.args[0] if e.args else e)
        if message.startswith(("'", '"')):  # ml_collections wraps a KeyError's repr
            message = message.strip("'\"").replace("\\'", "'").replace("\\n", " ")
            key = message.split("'")[1] if message.count("'") >= 2 else ""
            bad = [a for a in argv if key and a.startswith("--config.") and key in a.split("=")[0]]
            message = f"{bad[0].split('=')[0]}: no such key ({message})" if bad else message
    return (f"bad flag: {' '.join(message.split())} (list the config's keys with --config FILE "
            "--print_config)")


def _config_values(argv):
    """The file arguments of `--config FILE[:ARG]` / `--config=FILE[:ARG]` in `argv`."""
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--config" and i + 1 < len(argv):
            yield argv[i + 1]
        elif arg.startswith("--config="):
            yield arg.split("=", 1)[1]


def launch(run=None, train_step=None):
    """Parse the flags and train: `launch(run, train_step)` at the end of a forked train file."""
    app.run(functools.partial(main, run=run, train_step=train_step), flags_parser=parse_flags)
