"""KOSMOS-2 instruction tuning (paper Table 8), starting from the pretrained checkpoint.

    python -m kosmos2_jax.train --config experiments/kosmos2_instruct.py --workdir DIR \\
        --config.init.checkpoint=ckpt/kosmos2 --config.data.train_dir=DIR/grit/1.0.0 \\
        --config.data.grounded_instruct_dir=DIR/grit/1.0.0 \\
        --config.data.llava_file=llava_instruct_150k.json --config.data.llava_images=coco/train2014 \\
        --config.data.text_file=corpus.txt
    python -m kosmos2_jax.train --config experiments/kosmos2_instruct.py:runlocal --workdir /tmp/smoke

10,000 steps, 375 warm-up, LR 1e-5, the pretraining optimizer. Sources weighted by Table 8's batch
sizes: grounded pairs + grounded instructions 1,404 (split evenly here), vision-language
instructions (LLaVA-Instruct) 351, text 30. Rows are packed: 112 rows x 2048 tokens ~ 1,785
examples of ~130 tokens, Table 8's per-step batch (1,404 + 351 + 30). Not here yet: language
instructions (Unnatural Instructions, FLANv2, 117 per step) and interleaved data (15); put text in
`text_file`. Target: the released checkpoint's behaviour (its REG and grounded VQA prompts);
unmeasured (needs the pretrained weights and the instruction data).
"""

from kosmos2_jax.train import presets


def get_config(arg=None):
    args = presets.parse_arg(arg, runlocal=False, data=presets.DEMO_DATA)
    c = presets.base()
    c.optim.update(lr=1e-5, warmup_steps=375)
    c.train.update(steps=10000, batch_size=112)
    c.data.update(grounded_instruct_weight=702 / 702, llava_weight=351 / 702, text_weight=30 / 702)
    if args.runlocal:
        presets.runlocal(c, args.data)
        c.data.grounded_instruct_dir = c.data.train_dir  # shapes records are GRIT-schema
    return c
