"""KOSMOS-2 pretraining on GRIT (paper Table 7; the released train.sh): `presets.base()` with the chunked LM-head loss.

    python -m kosmos2_jax.train --config experiments/kosmos2_pretrain.py --workdir gs://BUCKET/kosmos2_pretrain \\
        --config.data.sources.train.data_dir=DIR/grit/1.0.0 --config.data.sources.caption.data_dir=DIR/laion/1.0.0 \\
        --config.data.sources.text.path=corpus.txt \\
        --config.data.sources.interleaved.path=mmc4/docs --config.data.sources.interleaved.data_dir=mmc4/images
    python -m kosmos2_jax.train --config experiments/kosmos2_pretrain.py --compile_only --topology v5p-128 \\
        --config.train.batch_size=256                                  # memory and sharding, no TPU needed
    python -m kosmos2_jax.train --config experiments/kosmos2_pretrain.py:tpu --compile_only --topology v5p-128
    python -m kosmos2_jax.train --config experiments/kosmos2_pretrain.py:runlocal --workdir /tmp/smoke

AdamW b=(0.9, 0.98), eps 1e-6, weight decay 0.01, peak LR 2e-4, 375 warm-up steps, linear decay to 0
at 60k steps, grad-norm clip 2.0, dropout 0.1, 2048-token packed rows (208 x 2048 = 426K tokens per
step, the paper's ~419K), span mode `expression`, score > 0.65, grounded form with probability 0.5,
1.66B parameters (the released architecture), mesh fsdp = every device. The mixture (Table 7,
sequences per step): grounded pairs (`sources.train`, GRIT) 1,117, image-caption pairs
(`sources.caption`: LAION/COYO img2dataset output built with `data/grit`) 1,117, text 93,
interleaved documents (`sources.interleaved`: MMC4 or OBELICS JSONL and their images) 47.

Target: the paper's zero-shot results (Flickr30k Entities test R@1 78.7, RefCOCOg test 61.65;
`evaluate`). Not reproduced: it needs GRIT-91M and ~256 V100-days, and the paper started from
KOSMOS-1 (not public; `--config.init.hf_dir` starts from released weights). Measured: the compile-only check fits v5p-128 (18.4 GiB per device of 95) and v5e-256
(7.6 of 16), not v4-128 (README, *Pods*); on one H100 the step reaches 24-34% MFU with
`--config.model.attention_impl=cudnn --config.model.text.attention_dropout=0` (docs/benchmarks.md).
`:tpu` compile-only on v5p-64 (4 rows a chip): 29.0 GiB a chip of 95, XLA's estimate 583 ms a step,
46.6% MFU; the paper's settings (einsum attention) estimate 27.5-29.9% on v5p-128 (docs/benchmarks.md).
"""

from kosmos2_jax.train import presets


def get_config(arg=None):
    args = presets.parse_arg(arg, runlocal=False, tpu=False, data=presets.DEMO_DATA)
    c = presets.base()
    # the LM head in chunks where there are targets (train/loss.py): the plain loss's logits
    # (rows x 2048 x 65,037, float32) cost GiBs per device (docs/training.md, compile-only table)
    c.train.loss_impl = "chunked"
    if args.tpu:
        # `:tpu`, the best row of XLA's step-time estimates on v5p-128 (docs/benchmarks.md: einsum
        # vs splash x remat x batch 256/512): Pallas splash attention, which has no attention
        # dropout (the paper's 0.1 becomes 0), the config's remat, 256 rows a step (two a chip on
        # v5p-128: the paper's 208 does not divide by 128 chips).
        c.model.attention_impl = "splash"
        c.model.text.attention_dropout = 0.0
        c.model.remat_policy = "dots_with_no_batch_dims"
        c.train.batch_size = 256
    return presets.runlocal(c, args.data) if args.runlocal else c
