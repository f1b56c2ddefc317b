"""Fine-tune released KOSMOS-2 weights on referring expressions (RefCOCO/+/g).

    python -m kosmos2_jax.convert from-hf --hf_dir kosmos-2-patch14-224 --out ckpt/kosmos2
    python -m kosmos2_jax.data.build data/refcoco --config refcoco --data_dir TFDS --manual_dir MDETR/
    python -m kosmos2_jax.train --config experiments/finetune_refcoco.py --workdir DIR \\
        --config.init.checkpoint=ckpt/kosmos2 --config.data.sources.train.data_dir=TFDS/refcoco/refcoco/1.0.0 \\
        --config.data.val_dir=TFDS/refcoco/refcoco/1.0.0 --config.data.val_split=val \\
        --config.evals.grounding.data_dir=MDETR --config.evals.grounding.every=500
    python -m kosmos2_jax.train --config experiments/finetune_refcoco.py:lora=16 ...          # LoRA adapters
    python -m kosmos2_jax.train --config experiments/finetune_refcoco.py:lora=16,qlora=nf4 ... # QLoRA
    python -m kosmos2_jax.train --config experiments/finetune_refcoco.py:runlocal --workdir /tmp/smoke

Arguments: `lora=R` (0, the default: the paper's full fine-tune; R > 0: rank-R LoRA adapters on
the decoder's projections, nothing else trained, learning rate 2e-4; train/lora.py),
`qlora=int8|nf4` (with lora: the adapted kernels quantized), `runlocal`, `data=DIR`.

The paper's setting freezes the vision tower except its last layer. The refcoco builder writes
GRIT-style records (the expression is the caption and its one chunk); 256 expressions per step,
unpacked. `evals.grounding` scores RefCOCO val accuracy during the run. Target: above the
zero-shot 52.32 (RefCOCO val, paper Table 3); the fine-tuned baselines there reach 81-91.
Unmeasured (needs the released weights and COCO).
"""

from kosmos2_jax.train import presets


def get_config(arg=None):
    args = presets.parse_arg(arg, runlocal=False, data=presets.DEMO_DATA, lora=0, qlora="")
    c = presets.base()
    c.data.update(preprocess="square", grounded_prob=1.0, seq_len=256, pack=False)
    c.data.sources.text.weight = c.data.sources.caption.weight = 0.0  # the referring expressions only
    c.optim.update(lr=1e-5, warmup_steps=100)
    # chunked LM head: 256-token rows, ~20 targets each (docs/training.md, the compile-only memory table)
    c.train.update(steps=5000, batch_size=256, freeze="vision_except_last", loss_impl="chunked")
    if args.lora:
        c.train.update(freeze="none")
        c.train.lora.update(rank=args.lora, alpha=2.0 * args.lora, base_dtype=args.qlora or "float")
        c.optim.update(lr=2e-4, weight_decay=0.0)
    c.evals.grounding.update(task="refcoco", split="val")
    return presets.runlocal(c, args.data) if args.runlocal else c
