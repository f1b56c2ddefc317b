"""Hugging Face KOSMOS-2 checkpoints <-> kosmos2_jax checkpoints (the library: `kosmos2_jax.weights`).

    python -m kosmos2_jax.convert from-hf --hf_dir kosmos-2-patch14-224/ --out ckpt/kosmos2
    python -m kosmos2_jax.convert to-hf --checkpoint ckpt/kosmos2 --out hf_export/
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from kosmos2_jax.utils import cli, outputs
from kosmos2_jax.weights import abstract_params, export_hf, iter_checkpoint_leaves, load_hf, save_checkpoint

def main(argv=None) -> int:
    from kosmos2_jax.utils import cli
    from kosmos2_jax.utils import outputs

    parser = cli.ArgumentParser(prog="python -m kosmos2_jax.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="HF model folder -> kosmos2_jax checkpoint")
    a.add_argument("--hf_dir", required=True, type=cli.existing_dir, help="HF model folder (config.json + safetensors)")
    a.add_argument("--out", required=True, type=cli.output_dir, help="checkpoint folder to write")
    b = sub.add_parser("to-hf", help="kosmos2_jax checkpoint -> HF model folder")
    b.add_argument("--checkpoint", required=True, type=cli.existing_dir, help="kosmos2_jax checkpoint folder")
    b.add_argument("--out", required=True, type=cli.output_dir, help="HF folder to write")
    for p in (a, b):
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (whole, when the new one is complete)")
    args = parser.parse_args(argv)

    def convert() -> int:
        outputs.refuse_existing(args.out, args.overwrite)
        with outputs.atomic_dir(args.out) as tmp:  # a failure leaves --out as it was
            if args.command == "from-hf":  # each tensor read once, the HF file never held whole
                model, params = load_hf(args.hf_dir)
                count = save_checkpoint(tmp, model.config, params)
            else:
                model, leaves = iter_checkpoint_leaves(args.checkpoint)
                export_hf(tmp, model.config, leaves=leaves)
                count = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(abstract_params(model)))
        print(f"wrote {args.out}: {count:,} parameters")
        return 0
    return cli.run(convert)


if __name__ == "__main__":
    sys.exit(main())
