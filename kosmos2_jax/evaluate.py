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

import json
import os
import sys


def markdown(task: str, split: str, scored: int, missing: int, metrics: dict, paper: dict) -> str:
    """Our metrics beside the paper's, on the paper's scale (percent; CIDEr and METEOR x 100)."""
    rows = ["| task | split | scored | missing | metric | ours | paper |", "|---|---|---|---|---|---|---|"]
    for k, v in metrics.items():
        ref = paper.get(k)
        rows.append(f"| {task} | {split} | {scored} | {missing} | {k} | {v:.2f} | {'' if ref is None else ref} |")
    return "\n".join(rows)


def run_key(args, task_name: str) -> dict:
    """What a resumed evaluation must share with the one it resumes (`evaluation/runner.py`)."""
    from kosmos2_jax.utils.outputs import fingerprint

    return {"task": task_name, "split": args.split,  # the checkpoint by content: a moved folder is the same
            "checkpoint_fingerprint": fingerprint(args.checkpoint), "tokenizer_fingerprint": fingerprint(args.tokenizer),
            "data_dir": os.path.abspath(args.data_dir), "image_dir": os.path.abspath(args.image_dir) if args.image_dir else "",
            "max_examples": args.max_examples, "shots": args.shots, "shots_split": args.shots_split if args.shots else ""}


def parse_args(argv):
    from kosmos2_jax.utils import cli
    from kosmos2_jax.evaluation.tasks import TASKS

    p = cli.ArgumentParser(prog="python -m kosmos2_jax.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--checkpoint", required=True, type=cli.existing_dir, help="our checkpoint folder or a HF Kosmos-2 folder")
    p.add_argument("--tokenizer", required=True, type=cli.existing_file, help="sentencepiece model")
    p.add_argument("--data_dir", required=True, type=cli.existing_dir,
                   help="annotation folder (or prepared tfds folder for shapes)")
    p.add_argument("--image_dir", default="", help="image folder (default: DATA_DIR/images)")
    p.add_argument("--split", default="test")
    p.add_argument("--max_examples", type=cli.integer(0), default=0, help="the first N items (0: all)")
    p.add_argument("--batch_size", type=cli.integer(1), default=16)
    p.add_argument("--out", required=True, type=cli.output_file, help="results JSON (OUT.predictions.jsonl beside it)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace results and predictions of another run at --out (default: refuse)")
    p.add_argument("--shots", type=cli.integer(0), default=0, help="refcocog_reg: k demonstrations before each query (k-shot)")
    p.add_argument("--shots_split", default="train", help="refcocog_reg: the split the demonstrations come from")
    p.add_argument("--draw", type=cli.integer(0), default=0,
                   help="grounding tasks: write this many annotated PNGs next to --out")
    p.add_argument("--distributed", action="store_true",
                   help="several processes (jax.distributed): each evaluates a share of the batches and process 0 "
                        "writes the results; on TPU / Slurm / Open MPI the rest is detected, elsewhere give "
                        "--coordinator_address, --num_processes and --process_id")
    p.add_argument("--coordinator_address", default="", help="with --distributed: HOST:PORT of process 0")
    p.add_argument("--num_processes", type=cli.integer(0), default=0, help="with --distributed")
    p.add_argument("--process_id", type=cli.integer(-1), default=-1, help="with --distributed")
    cli.add_decode_mode_flags(p)
    cli.add_mesh_flag(p)
    cli.add_compilation_cache_flags(p)
    args = p.parse_args(argv)
    if args.image_dir and not os.path.isdir(args.image_dir):
        p.error(f"argument --image_dir: {args.image_dir!r} is not a folder")
    return args


def main(argv=None) -> int:
    from kosmos2_jax.utils import cli

    args = parse_args(argv)
    cli.apply_compilation_cache_flags(args)
    return cli.run(lambda: evaluate(args))


def evaluate(args) -> int:
    import jax

    from kosmos2_jax.models import sharding
    from kosmos2_jax.utils import multihost
    from kosmos2_jax.utils import outputs
    from kosmos2_jax.utils.errors import UsageError
    from kosmos2_jax.evaluation.runner import check_stream, run_shared
    from kosmos2_jax.evaluation.tasks import PAPER, TASKS, Context
    from kosmos2_jax.weights.hf import DECODING, load_model
    from kosmos2_jax.format.processor import processor_for

    task = TASKS[args.task]
    if args.distributed:
        multihost.initialize(args.coordinator_address, args.num_processes, args.process_id)
    mesh = sharding.local_mesh(args.mesh)  # over this process's devices
    if args.shots:
        if not hasattr(task, "with_shots"):
            raise UsageError(f"--shots applies to refcocog_reg, not {args.task}")
        task = task.with_shots(args.shots, args.shots_split)
    name = getattr(task, "name", args.task)
    key = run_key(args, name)
    if os.path.isfile(args.out) and not args.overwrite:  # a results file of another run is never relabelled
        try:
            with open(args.out) as f:
                saved = json.load(f).get("run_key")
        except (ValueError, AttributeError):
            saved = None
        if saved != key:
            raise UsageError(f"--out {args.out!r} holds the results of another run"
                             + (f" ({'; '.join(outputs.key_differences(saved, key))})" if saved else "")
                             + ": pass --overwrite to replace them, or another --out")
    jsonl = os.path.splitext(os.path.abspath(args.out))[0] + ".predictions.jsonl"
    if jax.process_count() == 1:  # refuse another run's predictions before loading anything
        check_stream(jsonl, key, args.overwrite)
    items = task.load(args.data_dir, args.split)
    if args.max_examples:
        items = items[:args.max_examples]
    if not items:
        raise UsageError(f"no {args.task} items in split {args.split!r} of {args.data_dir}")
    image_dir = args.image_dir or os.path.join(args.data_dir, "images")
    if any("image" in it for it in items) and not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir} (pass --image_dir)")
    model, params = load_model(args.checkpoint, **DECODING)
    processor = processor_for(args.tokenizer, model)
    ctx = Context(model, params, processor, image_dir=image_dir, batch_size=args.batch_size,
                  decode_mode=args.decode_mode, tokens_per_call=args.tokens_per_call, mesh=mesh)
    records = run_shared(items, lambda batch: task.predict(ctx, batch), jsonl, args.batch_size,
                         key=key, overwrite=args.overwrite)
    if not multihost.is_primary():  # process 0 writes and prints the results
        return 0
    metrics = task.score(records)
    missing = sum(bool(r.get("missing_image")) for r in records)
    paper = PAPER.get(name, {}).get(args.split, {})
    result = {"task": name, "split": args.split, "checkpoint": args.checkpoint, "run_key": key,
              "count": len(records), "scored": len(records) - missing, "missing_images": missing,
              "unit": "percent (CIDEr, METEOR x 100), as the paper", "metrics": metrics, "paper": paper,
              "predictions": records}
    if "accuracy" in metrics:
        result["accuracy"] = metrics["accuracy"]
    outputs.write_json(args.out, result, indent=2)
    if hasattr(task, "server_json"):
        server = os.path.splitext(os.path.abspath(args.out))[0] + ".server.json"
        outputs.write_json(server, task.server_json(records))
        print(f"wrote the evaluation server's JSON to {server}")
    if missing:
        print(f"{missing} of {len(records)} items had a missing or unreadable image (not scored)", file=sys.stderr)
    print(markdown(name, args.split, len(records) - missing, missing, metrics, paper))
    if args.draw:
        _draw(items, records, args.draw, ctx, os.path.dirname(os.path.abspath(args.out)))
    return 0


def _draw(items, records, n, ctx, folder):
    from kosmos2_jax.format.visualize import draw_entities

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
