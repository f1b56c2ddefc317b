"""Fine-tune released KOSMOS-2 weights on your own boxes (COCO detection format) with LoRA, QLoRA
or a full fine-tune: the recipe for one GPU.

    python -m kosmos2_jax.convert from-hf --hf_dir kosmos-2-patch14-224 --out ckpt/kosmos2
    python -m kosmos2_jax.train --config experiments/finetune_coco.py --workdir DIR \\
        --config.init.checkpoint=ckpt/kosmos2 \\
        --config.data.sources.train.path=annotations/instances_train2017.json \\
        --config.data.sources.train.data_dir=train2017
    python -m kosmos2_jax.train --config experiments/finetune_coco.py:qlora=nf4 ...  # QLoRA: 4-bit base kernels
    python -m kosmos2_jax.train --config experiments/finetune_coco.py:lora=0 ...     # full: all but the vision tower
    python -m kosmos2_jax.export --workdir DIR --out ckpt/finetuned                  # adapters merged
    python -m kosmos2_jax.train --config experiments/finetune_coco.py:runlocal --workdir /tmp/smoke

Arguments (`FILE:ARG`, comma-separated): `lora=R` (the adapters' rank, default 16; 0 = a full
fine-tune with the vision tower frozen but its last layer, the paper's setting), `qlora=int8|nf4`
(the adapted kernels quantized), `runlocal`, `data=DIR`.

Each image's categories become a detection prompt naming them ("person, dog, frisbee", every box of
a category on its name; data/annotations.py), always grounded. Other formats: set
`data.sources.train.kind` to `odvg` (Grounding DINO's JSONL) or `refexp` (one referring expression
a line). LoRA on the decoder's attention and MLP projections (train/lora.py's default targets),
rank 16, alpha 32, learning rate 2e-4 (10x the full fine-tune's: the adapters start at zero),
bfloat16 compute, 32 rows of 256 tokens a step in 4 micro-batches, the chunked LM-head loss.

Memory per chip and bytes per parameter: docs/training.md, "Fine-tuning with LoRA". Unmeasured on
real data (needs the released weights and COCO); the CPU check of what LoRA learns is the shapes
one in README, "Fine-tune on your own data".
"""

from kosmos2_jax.train import presets


def get_config(arg=None):
    args = presets.parse_arg(arg, runlocal=False, data=presets.DEMO_DATA, lora=16, qlora="")
    c = presets.base()
    c.data.sources.train.update(kind="coco", data_dir="", path="")  # the annotation file and its images
    c.data.update(preprocess="square", grounded_prob=1.0, seq_len=256, pack=False)
    c.data.sources.text.weight = c.data.sources.caption.weight = 0.0  # the boxes only
    c.model.dtype = "bfloat16"
    # 32 rows a step in 4 micro-batches: 8 rows' activations at a time (one 16 GiB chip, a 24 GB GPU)
    c.train.update(steps=3000, batch_size=32, grad_accum_steps=4, loss_impl="chunked")
    if args.lora:
        c.train.lora.update(rank=args.lora, alpha=2.0 * args.lora, base_dtype=args.qlora or "float")
        c.optim.update(lr=2e-4, warmup_steps=100, weight_decay=0.0)
    else:
        c.train.freeze = "vision_except_last"
        c.optim.update(lr=2e-5, warmup_steps=100)
    c.evals.grounding.update(task="refcocog", split="val", every=0)  # set its data_dir to score during the run
    return presets.runlocal(c, args.data) if args.runlocal else c
