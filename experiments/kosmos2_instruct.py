"""KOSMOS-2 instruction tuning (paper Table 8), starting from the pretrained checkpoint.

    python -m kosmos2_jax.train --config experiments/kosmos2_instruct.py --workdir DIR \\
        --config.init.checkpoint=ckpt/kosmos2 --config.data.sources.train.data_dir=DIR/grit/1.0.0 \\
        --config.data.sources.grounded_instruct.data_dir=DIR/grit/1.0.0 \\
        --config.data.sources.llava.path=llava_instruct_150k.json --config.data.sources.llava.data_dir=coco/train2014 \\
        --config.data.sources.flan.path=flan_mixture.jsonl \\
        --config.data.sources.unnatural_instructions.path=unnatural/core_data.jsonl \\
        --config.data.sources.text.path=corpus.txt \\
        --config.data.sources.interleaved.path=mmc4/docs --config.data.sources.interleaved.data_dir=mmc4/images
    python -m kosmos2_jax.train --config experiments/kosmos2_instruct.py:runlocal --workdir /tmp/smoke

10,000 steps, 375 warm-up, LR 1e-5, the pretraining optimizer. Sources weighted by Table 8's batch
sizes: grounded pairs + grounded instructions 1,404 (split evenly here), vision-language
instructions (LLaVA-Instruct) 351, language instructions 117 (FLANv2 and Unnatural Instructions,
split evenly), text 30, interleaved documents 15. Rows are packed: 112 rows x 2048 tokens ~ 1,900
examples of ~120 tokens, Table 8's per-step batch (1,404 + 351 + 117 + 30 + 15). Target: the
released checkpoint's behaviour (its REG and grounded VQA prompts); unmeasured (needs the
pretrained weights and the instruction data).
"""

from kosmos2_jax.train import presets


def get_config(arg=None):
    args = presets.parse_arg(arg, runlocal=False, data=presets.DEMO_DATA)
    c = presets.base()
    c.optim.update(lr=1e-5, warmup_steps=375)
    # the LM head in chunks where there are targets: the plain loss's logits (rows x 2048 x 65,037,
    # float32) cost GiBs per device (docs/training.md, the compile-only memory table)
    c.train.update(steps=10000, batch_size=112, loss_impl="chunked")
    # Table 8, sequences per step
    for name, weight in dict(train=702, grounded_instruct=702, llava=351, flan=58.5, unnatural_instructions=58.5,
                             text=30, interleaved=15, caption=0).items():
        c.data.sources[name].weight = weight
    return presets.runlocal(c, args.data) if args.runlocal else c
