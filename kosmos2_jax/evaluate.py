"""Evaluate a checkpoint on the paper's benchmarks with the paper's protocols (reference §5).

    python -m kosmos2_jax.evaluate --task TASK --checkpoint DIR --tokenizer SPM --data_dir DIR \\
        [--image_dir DIR] [--split S] [--max_examples N] [--batch_size B] --out results.json [--draw N]
        [--shots K]  # refcocog_reg k-shot

Tasks: shapes, refcoco, refcoco+, refcocog, refcocog_reg, flickr30k_entities, flickr30k_caption, coco_caption,
vqav2, language (data layouts: `kosmos2_jax/evaluation/tasks.py`). Predictions stream to
OUT.predictions.jsonl (an interrupted run resumes there); the results JSON holds the metrics, the
paper's numbers and every prediction, and a Markdown table is printed. With `--distributed`, each
process evaluates its share of the batches (OUT.predictions.process_P-of-N.jsonl) with the whole
model on one of its devices, and process 0 writes the combined results: the same as one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def markdown(task: str, split: str, count: int, metrics: dict, paper: dict) -> str:
    rows = ["| task | split | items | metric | ours | paper |", "|---|---|---|---|---|---|"]
    for k, v in metrics.items():
        ref = paper.get(k)
        rows.append(f"| {task} | {split} | {count} | {k} | {v:.3f} | {'' if ref is None else ref} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    from kosmos2_jax.evaluation.tasks import PAPER, TASKS

    p = argparse.ArgumentParser(prog="python -m kosmos2_jax.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--checkpoint", required=True, help="our checkpoint folder or a HF Kosmos-2 folder")
    p.add_argument("--tokenizer", required=True, help="sentencepiece model")
    p.add_argument("--data_dir", required=True, help="annotation folder (or prepared tfds folder for shapes)")
    p.add_argument("--image_dir", default="", help="image folder (default: DATA_DIR/images)")
    p.add_argument("--split", default="test")
    p.add_argument("--max_examples", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--out", required=True)
    p.add_argument("--shots", type=int, default=0, help="refcocog_reg: k demonstrations before each query (k-shot)")
    p.add_argument("--shots_split", default="train", help="refcocog_reg: the split the demonstrations come from")
    p.add_argument("--draw", type=int, default=0, help="grounding tasks: write this many annotated PNGs next to --out")
    p.add_argument("--distributed", action="store_true",
                   help="several processes (jax.distributed): each evaluates a share of the batches and process 0 "
                        "writes the results; on TPU / Slurm / Open MPI the rest is detected, elsewhere give:")
    p.add_argument("--coordinator_address", default="", help="with --distributed: HOST:PORT of process 0")
    p.add_argument("--num_processes", type=int, default=0, help="with --distributed")
    p.add_argument("--process_id", type=int, default=-1, help="with --distributed")
    args = p.parse_args(argv)

    from kosmos2_jax import multihost
    from kosmos2_jax.evaluation.runner import run_shared
    from kosmos2_jax.evaluation.tasks import Context
    from kosmos2_jax.predict import load_model, tokenizer_for
    from kosmos2_jax.processor import Kosmos2Processor

    task = TASKS[args.task]
    try:
        if args.distributed:
            multihost.initialize(args.coordinator_address, args.num_processes, args.process_id)
        if args.shots:
            if not hasattr(task, "with_shots"):
                raise ValueError(f"--shots applies to refcocog_reg, not {args.task}")
            task = task.with_shots(args.shots, args.shots_split)
        items = task.load(args.data_dir, args.split)
        if args.max_examples:
            items = items[:args.max_examples]
        if not items:
            raise ValueError(f"no {args.task} items in split {args.split!r} of {args.data_dir}")
        image_dir = args.image_dir or os.path.join(args.data_dir, "images")
        if any("image" in it for it in items) and not os.path.isdir(image_dir):
            raise FileNotFoundError(f"image folder not found: {image_dir} (pass --image_dir)")
        model, params = load_model(args.checkpoint)
        tokenizer = tokenizer_for(args.tokenizer, model)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    processor = Kosmos2Processor(tokenizer, image_size=model.config.vision.image_size,
                                 num_image_tokens=model.config.latent_query_num)
    ctx = Context(model, params, processor, image_dir=image_dir, batch_size=args.batch_size)
    jsonl = os.path.splitext(os.path.abspath(args.out))[0] + ".predictions.jsonl"
    records = run_shared(items, lambda batch: task.predict(ctx, batch), jsonl, args.batch_size)
    if not multihost.is_primary():  # process 0 writes and prints the results
        return 0
    metrics = task.score(records)
    missing = sum(bool(r.get("missing_image")) for r in records)
    name = getattr(task, "name", args.task)
    paper = PAPER.get(name, {}).get(args.split, {})
    result = {"task": name, "split": args.split, "checkpoint": args.checkpoint, "count": len(records),
              "missing_images": missing, "metrics": metrics, "paper": paper, "predictions": records}
    if "accuracy" in metrics:
        result["accuracy"] = metrics["accuracy"]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if hasattr(task, "server_json"):
        server = os.path.splitext(os.path.abspath(args.out))[0] + ".server.json"
        with open(server, "w") as f:
            json.dump(task.server_json(records), f)
        print(f"wrote the evaluation server's JSON to {server}")
    if missing:
        print(f"{missing} of {len(records)} items had a missing or unreadable image (not scored)", file=sys.stderr)
    print(markdown(name, args.split, len(records), metrics, paper))
    if args.draw:
        _draw(items, records, args.draw, ctx, os.path.dirname(os.path.abspath(args.out)))
    return 0


def _draw(items, records, n, ctx, folder):
    from kosmos2_jax.visualize import draw_entities

    drawn = 0
    for item, rec in zip(items, records):
        if drawn == n or "predicted" not in rec or rec.get("missing_image"):
            continue
        image = ctx.image(item).resize((256, 256))
        truths = [item["target"]] if "target" in item else item.get("targets", [])
        entities = [(f"truth: {item['phrase']}", (0, 0), [tuple(t) for t in truths])]
        entities += [(f"model (IoU {rec.get('iou', 0):.2f})", (0, 0), [tuple(b)]) for b in rec["predicted"][:1]]
        draw_entities(image, entities).save(os.path.join(folder, f"example_{drawn}.png"))
        drawn += 1
    print(f"wrote {drawn} annotated examples to {folder}")


if __name__ == "__main__":
    sys.exit(main())
