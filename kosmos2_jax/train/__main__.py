"""Train from an experiment config.

    python -m kosmos2_jax.train --config experiments/shapes_tiny.py --workdir workdir/shapes_tiny \\
        [--config.train.steps=300 --config.mesh.data=2 ...]

    python -m kosmos2_jax.train --config experiments/kosmos2_pretrain.py --compile_only --topology v5p-128

    python -m kosmos2_jax.train --config experiments/shapes_tiny.py --print_config   # every key

This module only parses flags; the run is `kosmos2_jax/train/loop.py`. It resumes automatically
from the latest checkpoint in the workdir (train state and data position), after checking that the config builds the checkpoint's model (changed settings are listed); a
step that does not restore is named, and `--config.train.resume_step=N` resumes from an earlier
one. SIGTERM saves a checkpoint and exits; at the end the params are exported to WORKDIR/export
(a `convert.load_checkpoint` folder, replaced whole). TensorBoard logs go to WORKDIR/tb. Every
setting is range-checked before any work; an error is one line and exit code 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from kosmos2_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, logs and the export go")
flags.DEFINE_bool("compile_only", False, "compile the train step for --topology and report memory and sharding; "
                  "trains nothing (train/compile_check.py)")
flags.DEFINE_string("topology", "", "with --compile_only: a TPU slice, e.g. v5p-128 or v5p:4x4x8 (needs libtpu)")
flags.DEFINE_bool("print_config", False, "print the config (every key --config.KEY=VALUE can set) and exit")
flags.DEFINE_string("compilation_cache", cli.default_compilation_cache(),
                    "persistent XLA compilation cache: a rerun or resume of the same config loads its programs "
                    "instead of compiling them (env KOSMOS2_COMPILATION_CACHE)")
flags.DEFINE_bool("no_compilation_cache", False, "compile afresh and write no cache")
flags.DEFINE_enum("xla_gpu_preset", "training", list(cli.GPU_XLA_PRESETS),
                  "on NVIDIA GPUs: XLA flags added to XLA_FLAGS (cli.GPU_XLA_PRESETS: latency-hiding scheduler, "
                  "pipelined and combined collectives); none adds nothing")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep Orbax/tfds INFO lines out of the console log
    from kosmos2_jax.cli import USER_ERRORS

    cli.use_gpu_xla_flags(FLAGS.xla_gpu_preset)  # before JAX starts its backend
    cli.use_compilation_cache(None if FLAGS.no_compilation_cache else FLAGS.compilation_cache)
    try:
        if FLAGS.print_config:
            print(FLAGS.config)
            return
        if FLAGS.compile_only:
            if not FLAGS.topology:
                raise ValueError("--compile_only needs --topology (e.g. v5p-128 or v5p:4x4x8)")
            from kosmos2_jax.train import config_check
            from kosmos2_jax.train.compile_check import check

            config_check.check(FLAGS.config, need_tokenizer=False, need_data=False)
            check(FLAGS.config, FLAGS.topology)
            return
        if not FLAGS.workdir:
            raise ValueError("--workdir is required (where checkpoints, logs and the export go)")
        from kosmos2_jax.train.loop import run

        run(FLAGS.config, FLAGS.workdir)
    except USER_ERRORS as e:
        if os.environ.get("KOSMOS2_DEBUG"):
            raise
        from kosmos2_jax.cli import stderr

        print(f"error: {e}", file=stderr(), flush=True)
        sys.stdout.flush()
        # Not sys.exit: after a failed Orbax restore, its event-loop threads print tracebacks at
        # interpreter shutdown.
        os._exit(2)


def parse_flags(argv):
    """absl's flag parsing, with a bad `--config.KEY=VALUE` (an unknown key, a value of the wrong
    type) as one line instead of a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e.args[0] if e.args else e)
        if message.startswith(("'", '"')):  # ml_collections wraps a KeyError's repr
            message = message.strip("'\"").replace("\\'", "'").replace("\\n", " ")
            key = message.split("'")[1] if message.count("'") >= 2 else ""
            bad = [a for a in argv if key and a.startswith("--config.") and key in a.split("=")[0]]
            message = f"{bad[0].split('=')[0]}: no such key ({message})" if bad else message
    print(f"error: bad flag: {' '.join(message.split())} (list the config's keys with --config FILE --print_config)",
          file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
