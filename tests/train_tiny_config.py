"""A seconds-scale training config for tests: `--config tests/train_tiny_config.py:DATA_ROOT,SPM_PATH`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import shapes_tiny  # noqa: E402


def get_config(arg=None):
    data_root, spm = (arg or ",").split(",")
    c = shapes_tiny.get_config()
    c.tokenizer = spm
    c.model.vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8)
    c.model.text.update(embed_dim=64, layers=2, ffn_dim=128, attention_heads=4, dropout=0.1)
    c.model.latent_query_num = 8
    c.model.scan_layers = True  # the scanned stack (the tests look at stacked layer params)
    grounded = os.path.join(data_root, "shapes", "grounded", "1.0.0")
    c.data.sources.train.data_dir = grounded
    c.data.update(val_dir=grounded, val_batches=1, seq_len=48, shuffle_buffer=16, num_workers=2)
    c.evals.grounding.update(data_dir=os.path.join(data_root, "shapes", "refexp", "1.0.0"), max_items=4, every=0)
    c.train.update(batch_size=8, steps=12, log_every=1, eval_every=0, ckpt_every=4, keep=3, async_ckpt=False)
    c.optim.update(warmup_steps=2, optimizer="adamw")  # the default; tests that want Muon set it
    return c
