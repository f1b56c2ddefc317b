"""Evaluate a checkpoint on a benchmark.

    python -m kosmos2_jax.evaluate --task shapes --checkpoint workdir/shapes_tiny/export \\
        --tokenizer workdir/demo_data/spm/shapes.model --data_dir workdir/demo_data/tfds/shapes/refexp/1.0.0 \\
        --split test --out results.json [--max_examples N] [--batch_size B] [--draw 6]

Tasks available now: `shapes` (referring-expression grounding on the synthetic dataset, first box,
IoU >= 0.5). The paper's benchmarks (Flickr30k Entities, RefCOCO/+/g, captioning, VQA, language)
are not implemented yet.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

TASKS = ("shapes",)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kosmos2_jax.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data_dir", required=True, help="prepared tfds folder (e.g. .../shapes/refexp/1.0.0)")
    p.add_argument("--split", default="test")
    p.add_argument("--max_examples", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--out", required=True)
    p.add_argument("--draw", type=int, default=0, help="write this many annotated PNGs next to --out")
    args = p.parse_args(argv)

    import tensorflow_datasets as tfds
    from PIL import Image

    from kosmos2_jax.evaluation.refexp import evaluate_refexp
    from kosmos2_jax.predict import load_model, tokenizer_for
    from kosmos2_jax.processor import Kosmos2Processor
    from kosmos2_jax.visualize import draw_entities

    try:
        model, params = load_model(args.checkpoint)
        tokenizer = tokenizer_for(args.tokenizer, model)
        try:
            builder = tfds.builder_from_directory(args.data_dir)
        except Exception as e:
            raise ValueError(f"no prepared dataset at {args.data_dir!r}: {e}") from None
        ds = builder.as_dataset(split=args.split, shuffle_files=False)
        if args.max_examples:
            ds = ds.take(args.max_examples)
        items = list(ds.as_numpy_iterator())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    processor = Kosmos2Processor(tokenizer, image_size=model.config.vision.image_size,
                                 num_image_tokens=model.config.latent_query_num)
    start = time.time()

    def progress(done, total):
        rate = done / max(time.time() - start, 1e-9)
        print(f"\r{done}/{total} items, ETA {int((total - done) / rate)}s", end="", file=sys.stderr, flush=True)

    result = evaluate_refexp(model, params, processor, items, batch_size=args.batch_size, progress=progress)
    print(file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    summary = {"task": args.task, "split": args.split, "checkpoint": args.checkpoint,
               "accuracy": result["accuracy"], "count": result["count"]}
    with open(args.out, "w") as f:
        json.dump(dict(summary, predictions=result["predictions"]), f, indent=2)
    print(f"| task | split | items | first-box accuracy (IoU >= 0.5) |\n|---|---|---|---|\n"
          f"| {args.task} | {args.split} | {result['count']} | {result['accuracy']:.3f} |")
    for i, (item, pred) in enumerate(zip(items[:args.draw], result["predictions"])):
        image = Image.open(io.BytesIO(item["image"])).convert("RGB").resize((256, 256))
        entities = [(f"truth: {pred['expression']}", (0, 0), [tuple(pred["target"])])]
        entities += [(f"model (IoU {pred['iou']:.2f})", (0, 0), [tuple(b)]) for b in pred["predicted"]]
        path = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"example_{i}.png")
        draw_entities(image, entities).save(path)
    if args.draw:
        print(f"wrote {min(args.draw, len(items))} annotated examples next to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
