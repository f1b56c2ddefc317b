"""KOSMOS-2 instruction tuning (paper Table 8), starting from the pretrained checkpoint.

    python -m kosmos2_jax.train --config experiments/kosmos2_instruct.py --workdir DIR \\
        --config.init.checkpoint=ckpt/kosmos2 --config.data.train_dir=DIR/grit/1.0.0

10,000 steps, 375 warm-up, LR 1e-5, the pretraining optimizer. The paper mixes LLaVA-Instruct,
Unnatural Instructions, FLANv2 and grounded instruction data built from GRIT (Table 9 templates);
instruction sources are not implemented in the input pipeline yet, so this config currently
continues on grounded captions only.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kosmos2_pretrain  # noqa: E402


def get_config(arg=None):
    c = kosmos2_pretrain.get_config(arg)
    c.optim.update(lr=1e-5, warmup_steps=375)
    c.train.update(steps=10000, batch_size=1404)
    return c
