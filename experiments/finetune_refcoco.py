"""Fine-tune released KOSMOS-2 weights on referring expressions.

    python -m kosmos2_jax.convert from-hf --hf_dir kosmos-2-patch14-224 --out ckpt/kosmos2
    python -m kosmos2_jax.data.build data/refcoco --config refcoco --data_dir TFDS --manual_dir MDETR/
    python -m kosmos2_jax.train --config experiments/finetune_refcoco.py --workdir DIR \\
        --config.init.checkpoint=ckpt/kosmos2 --config.data.train_dir=TFDS/refcoco/refcoco/1.0.0 \\
        --config.data.val_dir=TFDS/refcoco/refcoco/1.0.0 --config.data.val_split=val

The paper's setting freezes the vision tower except its last layer. The refcoco builder writes
GRIT-style records (the expression is the caption and its one chunk). Expected: unmeasured.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kosmos2_pretrain  # noqa: E402


def get_config(arg=None):
    c = kosmos2_pretrain.get_config(arg)
    c.data.update(preprocess="square", grounded_prob=1.0, seq_len=256, pack=False)  # batch = 256 expressions
    c.optim.update(lr=1e-5, warmup_steps=100)
    c.train.update(steps=5000, batch_size=256, freeze="vision_except_last")
    return c
