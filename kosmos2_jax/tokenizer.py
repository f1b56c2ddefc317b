"""Train a sentencepiece model for a new domain (the library: `kosmos2_jax.format.tokenizer`).

    python -m kosmos2_jax.tokenizer train --input captions.txt --vocab_size 64 --out spm/shapes
"""

from __future__ import annotations

import sys
from typing import Sequence

from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer, train_sentencepiece

def main(argv: Sequence[str] | None = None) -> int:
    from kosmos2_jax.utils import cli

    parser = cli.ArgumentParser(prog="python -m kosmos2_jax.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a sentencepiece model for a new domain")
    train.add_argument("--input", required=True, type=cli.existing_file, help="text file, one caption per line")
    train.add_argument("--vocab_size", type=cli.integer(8), required=True, help="number of sentencepiece pieces")
    train.add_argument("--out", required=True, type=cli.output_file,
                       help="output prefix: writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
    train.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model / PREFIX.vocab")
    args = parser.parse_args(argv)

    def run() -> int:
        from kosmos2_jax.utils.outputs import refuse_existing

        for ext in (".model", ".vocab"):
            refuse_existing(args.out + ext, args.overwrite)
        path = train_sentencepiece(args.input, args.vocab_size, args.out, args.model_type)
        tok = Kosmos2Tokenizer.from_file(path)
        pieces = tok.sp.get_piece_size()
        print(f"wrote {path}: {pieces} pieces, KOSMOS-2 vocab {tok.vocab_size}")
        if pieces < args.vocab_size:
            print(f"note: {pieces} pieces, not --vocab_size {args.vocab_size}: {args.input} holds no more distinct "
                  "pieces to merge (sentencepiece stops early, hard_vocab_limit=False); more text gives more")
        return 0
    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main())
