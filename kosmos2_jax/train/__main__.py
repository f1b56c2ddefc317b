"""Train from an experiment config.

    python -m kosmos2_jax.train --config experiments/shapes_tiny.py --workdir workdir/shapes_tiny \\
        [--config.train.steps=300 --config.mesh.data=2 ...]

    python -m kosmos2_jax.train --config experiments/kosmos2_pretrain.py --compile_only --topology v5p-128

    python -m kosmos2_jax.train --config experiments/shapes_tiny.py --print_config   # every key

This module only starts `train/launch.py` (the flags); the run, with its loss and step, is
`kosmos2_jax/train/loop.py`. It resumes automatically
from the latest checkpoint in the workdir (train state and data position), after checking that the config builds the checkpoint's model (changed settings are listed); a
step that does not restore is named, and `--config.train.resume_step=N` resumes from an earlier
one. SIGTERM saves a checkpoint and exits; at the end the params are exported to WORKDIR/export
(a `weights.load_checkpoint` folder, replaced whole). TensorBoard logs go to WORKDIR/tb. Every
setting is range-checked before any work; an error is one line and exit code 2.
"""

from kosmos2_jax.train.launch import launch

if __name__ == "__main__":
    launch()
