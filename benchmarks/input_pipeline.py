"""Input pipeline throughput vs its floor (decode + resize alone), same records, same run.

    .venv/bin/python benchmarks/input_pipeline.py [--kind grit|caption|interleaved] [--examples 2000]
                                                  [--workers 4] [--examples_per_task 8] [--rounds 15]

Builds a shapes dataset (128 px PNGs) in a temporary folder, then measures examples/s of
(a) decode + 224 px resize only (uint8; the CLIP normalization runs on the device), through the
same thread pool in the same tasks of `--examples_per_task` records, and (b) the whole pipeline
(record reads, decode, resize, span selection, grounded/plain choice, tokenization, masks,
padding, batching), alternating the two for --rounds rounds. Prints the medians, the median
per-round ratio (target >= 80%) and the ratio of process CPU time per example.

`--kind caption` reads the same records as plain pairs. `--kind interleaved` writes the images to
files and MMC4-style documents of 3 images and 3 captions each (packed 1024-token rows of up to 6
images); both sides then count images: (a) reads, decodes and resizes each image file, (b) is the
whole pipeline (documents read and split into chunks, tokenized, images decoded, rows packed).
"""

import argparse
import collections
import concurrent.futures
import gc
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from kosmos2_jax.data.build import build  # noqa: E402
from kosmos2_jax.data.examples import ExampleConfig, decode_image, preprocess  # noqa: E402
from kosmos2_jax.data.pipeline import END_OF_SPLIT, Pipeline, Source, _tfds_records  # noqa: E402
from kosmos2_jax.format.processor import Kosmos2Processor  # noqa: E402
from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer, train_sentencepiece  # noqa: E402


def tokenizer(tmp):
    spm = os.environ.get("KOSMOS2_SPM_MODEL") or str(REPO.parent / "shared" / "kosmos2" / "sentencepiece.bpe.model")
    if not os.path.isfile(spm):
        lines = tmp / "captions.txt"
        lines.write_text("\n".join(f"a red circle to the left of {i} blue squares" for i in range(500)))
        spm = train_sentencepiece(str(lines), 200, str(tmp / "spm"))
    return Kosmos2Tokenizer.from_file(spm), spm


def write_documents(records_source, tmp):
    """The shapes records' images as files and MMC4-style documents of 3 images, each before its
    record's caption -> (the interleaved Source, the image files in document order)."""
    import json

    images, docs = tmp / "images", tmp / "docs.jsonl"
    images.mkdir()
    records = _tfds_records(records_source, 0, 0, 1, 0, 1, repeat=False, mark_end=True)
    files, doc = [], {"text_list": [], "image_info": []}
    with open(docs, "w") as out:
        for record in records:
            if record is END_OF_SPLIT:
                break
            name = f"{len(files)}.png"
            (images / name).write_bytes(record["image"])
            files.append(str(images / name))
            doc["image_info"].append({"image_name": name, "matched_text_index": len(doc["text_list"])})
            doc["text_list"].append(record["caption"].decode())
            if len(doc["text_list"]) == 3:
                out.write(json.dumps(doc) + "\n")
                doc = {"text_list": [], "image_info": []}
    records.close()
    files = files[:len(files) // 3 * 3]  # whole documents only
    return Source("documents", "interleaved", path=str(docs), data_dir=str(images)), files


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--examples_per_task", type=int, default=8)
    parser.add_argument("--kind", choices=("grit", "caption", "interleaved"), default="grit")
    args = parser.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp())
    os.environ.update(SHAPES_NUM_TRAIN=str(args.examples), SHAPES_NUM_EVAL="1")
    build(str(REPO / "data" / "shapes"), str(tmp))
    source = Source("shapes", "caption" if args.kind == "caption" else "grit",
                    data_dir=str(tmp / "shapes" / "grounded" / "1.0.0"))
    tok, spm = tokenizer(tmp)
    processor = Kosmos2Processor(tok)
    config = ExampleConfig(seq_len=1024 if args.kind == "interleaved" else 128)
    n = args.examples
    packing = {}
    if args.kind == "interleaved":  # the same images as files, in documents of 3
        source, image_files = write_documents(source, tmp)
        packing = dict(pack=True, pack_max_images=6)

    pool = concurrent.futures.ThreadPoolExecutor(args.workers)
    lookahead = max(32, 2 * args.workers * args.examples_per_task)  # the pipeline's, at batch size 16
    floor_fn = lambda r: preprocess(decode_image(r["image"]), 224, "square", np.zeros((0, 4)), 0.2)[0]

    def steady_rate(items):
        """(examples/s from the first item on, seconds to the first item, process CPU ms per example
        from the first item on): a training run pays the start-up (opening the files, filling the
        shuffle buffer) once, then runs at the steady rate. CPU time per example (all threads,
        TF's included) moves much less with the neighbours' load than wall time."""
        start = time.perf_counter()
        first = first_cpu = None
        count = 0
        for examples in items:
            if first is None:
                first, first_cpu = time.perf_counter(), time.process_time()
            else:
                count += examples
        return (count / (time.perf_counter() - first), first - start,
                (time.process_time() - first_cpu) / count * 1e3)

    def floor_items(records):
        # Reads records as it goes and hands them to the pool in tasks of `--examples_per_task`,
        # `lookahead` examples in flight, as the pipeline does (`pool.map` would read the whole
        # split up front).
        def run(task):
            return [floor_fn(r) for r in task]

        pending, task = collections.deque(), []
        for record in records:
            if record is not END_OF_SPLIT:
                task.append(record)
            if task and (len(task) == args.examples_per_task or record is END_OF_SPLIT):
                pending.append(pool.submit(run, task))
                task = []
            while len(pending) * args.examples_per_task >= lookahead:
                yield len(pending.popleft().result())
            if record is END_OF_SPLIT:
                break
        while pending:
            yield len(pending.popleft().result())

    # tf.data objects take up to ~2 s to tear down under load; that happens after each timed
    # region (close + collect), not in whichever measurement the garbage collector next runs in.
    def floor_rate():
        if args.kind == "interleaved":
            def image_records():
                for path in image_files:
                    with open(path, "rb") as f:
                        yield {"image": f.read()}
                yield END_OF_SPLIT
            return steady_rate(floor_items(image_records()))
        records = _tfds_records(source, 0, 0, 1, 0, 1, repeat=False, mark_end=True)
        rate = steady_rate(floor_items(records))
        records.close()
        gc.collect()
        return rate

    def pipeline_rate():
        pipe = Pipeline([source], processor, config, batch_size=16 if not packing else 4, seed=0, repeat=False,
                        num_workers=args.workers, examples_per_task=args.examples_per_task, **packing)
        count = (lambda b: int(b["has_image"].sum())) if packing else (lambda b: len(b["input_ids"]))
        rate = steady_rate(count(b) for b in pipe)
        pipe.close()
        gc.collect()
        return rate

    # Alternate the two measurements so that load from other processes on a shared machine hits
    # both alike, and report the median of the per-round ratios.
    floor_rate()  # warm the file cache, the thread pool and both code paths
    pipeline_rate()
    rounds = []
    for i in range(args.rounds):
        rounds.append(floor_rate() + pipeline_rate())
        floor, floor_start, floor_cpu, full, full_start, full_cpu = rounds[-1]
        print(f"round {i + 1}: floor {floor:.0f}/s, whole pipeline {full:.0f}/s, {full / floor:.0%}; "
              f"first item after {floor_start:.2f} s / {full_start:.2f} s; "
              f"CPU {floor_cpu:.2f} / {full_cpu:.2f} ms each", flush=True)
    floor, floor_start, floor_cpu, full, full_start, full_cpu = (float(v) for v in np.median(rounds, axis=0))
    ratio = float(np.median([r[3] / r[0] for r in rounds]))
    cpu_ratio = float(np.median([r[2] / r[5] for r in rounds]))
    unit = "images (3 per document)" if packing else "examples"
    print(f"{args.kind}: {n} shapes {unit} (128 px PNG -> 224 px), seq_len {config.seq_len}, {args.workers} threads, "
          f"{os.cpu_count()} cores, tokenizer {os.path.basename(spm)}, {args.rounds} rounds")
    per = "image" if packing else "example"
    print(f"| stage | {per}s/s (steady, median) | first item after (median) | CPU per {per} (median) |")
    print("|---|---|---|---|")
    print(f"| decode + resize only (floor) | {floor:.0f} | {floor_start:.2f} s | {floor_cpu:.2f} ms |")
    fills = "" if packing else " (fills the 1024-record shuffle buffer)"
    print(f"| whole pipeline | {full:.0f} | {full_start:.2f} s{fills} "
          f"| {full_cpu:.2f} ms |")
    print(f"whole / floor = {ratio:.0%} (median of the per-round ratios; target >= 80%); "
          f"by CPU time per example {cpu_ratio:.0%}")


if __name__ == "__main__":
    main()
