"""KOSMOS-2 pretraining on GRIT (paper Table 7; the released train.sh).

    python -m kosmos2_jax.train --config experiments/kosmos2_pretrain.py --workdir gs://BUCKET/kosmos2_pretrain \\
        --config.data.train_dir=DIR/grit/1.0.0 --config.data.text_file=corpus.txt --config.mesh.fsdp=-1 \\
        --config.mesh.data=1

AdamW b=(0.9, 0.98), eps 1e-6, weight decay 0.01, peak LR 2e-4, 375 warm-up steps, linear decay to 0
at 60k steps, grad-norm clip 2.0, dropout 0.1, 2048-token sequences, span mode `expression`,
score > 0.65, grounded form with probability 0.5. The paper's batch is ~419K tokens/step over a
mixture (text 93, image-caption 1117, grounded 1117, interleaved 47 sequences); only GRIT and plain
text sources exist here yet. The paper initialized from KOSMOS-1 (not public): set
--config.init.hf_dir to a converted checkpoint to start from released weights. Expected: not
reproducible here (needs GRIT-91M and 256 V100-days). On GPUs, `--config.model.attention_impl=cudnn
--config.model.text.attention_dropout=0` trades the paper's attention dropout for cuDNN's fused
flash attention (benchmarks/train_mfu.py --attention cudnn measures the difference).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes_tiny  # noqa: E402


def get_config(arg=None):
    del arg
    c = shapes_tiny.get_config()
    c.tokenizer = "sentencepiece.bpe.model"
    c.num_location_tokens = 1024
    c.model.vision = ml_collections.ConfigDict(dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=14, attention_dropout=0.0))
    c.model.text = ml_collections.ConfigDict(dict(
        vocab_size=65037, max_position_embeddings=2048, embed_dim=2048, layers=24, ffn_dim=8192, attention_heads=32,
        dropout=0.1, attention_dropout=0.1))
    c.model.latent_query_num = 64
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "dots_with_no_batch_dims"
    c.model.scan_layers = True  # one compiled layer for 24
    c.data.update(train_dir="", val_dir="", text_file="", text_weight=93 / 1117, seq_len=2048,
                  preprocess="resize_shorter_center_crop", span_mode="expression", grounded_prob=0.5,
                  shuffle_buffer=10000, num_workers=16, grounding_dir="",
                  # ~100-token grounded captions packed into 2048-token rows: 208 rows x 2048 tokens
                  # = 426K tokens/step, the paper's ~419K
                  pack=True, pack_max_images=24)
    # The released model's init (HF's), not the demo's from-scratch tables (see train/init.py).
    c.init.update(sincos_positions=False, sincos_locations=False, connector_dense_std=0.0)
    c.optim.update(lr=2e-4, warmup_steps=375, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, clip_norm=2.0)
    c.train.update(batch_size=208, steps=60000, freeze="none", log_every=50, eval_every=2000, ckpt_every=1000,
                   location_loss_weight=1.0,  # the paper's plain LM loss
                   loss_chunk=64,  # 26 rows/device x 64 positions per LM-head matmul
                   keep=3)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
