"""Input pipeline throughput vs its floor (decode + resize alone), same records, same run.

    .venv/bin/python benchmarks/input_pipeline.py [--examples 2000] [--workers 4] [--examples_per_task 8]
                                                  [--rounds 15]

Builds a shapes dataset (128 px PNGs) in a temporary folder, then measures examples/s of
(a) decode + 224 px resize only (uint8; the CLIP normalization runs on the device), through the
same thread pool in the same tasks of `--examples_per_task` records, and (b) the whole pipeline
(record reads, decode, resize, span selection, grounded/plain choice, tokenization, masks,
padding, batching), alternating the two for --rounds rounds. Prints the medians, the median
per-round ratio (target >= 80%) and the ratio of process CPU time per example.
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
from kosmos2_jax.processor import Kosmos2Processor  # noqa: E402
from kosmos2_jax.tokenizer import Kosmos2Tokenizer, train_sentencepiece  # noqa: E402


def tokenizer(tmp):
    spm = os.environ.get("KOSMOS2_SPM_MODEL") or str(REPO.parent / "shared" / "kosmos2" / "sentencepiece.bpe.model")
    if not os.path.isfile(spm):
        lines = tmp / "captions.txt"
        lines.write_text("\n".join(f"a red circle to the left of {i} blue squares" for i in range(500)))
        spm = train_sentencepiece(str(lines), 200, str(tmp / "spm"))
    return Kosmos2Tokenizer.from_file(spm), spm


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--examples_per_task", type=int, default=8)
    args = parser.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp())
    os.environ.update(SHAPES_NUM_TRAIN=str(args.examples), SHAPES_NUM_EVAL="1")
    build(str(REPO / "data" / "shapes"), str(tmp))
    source = Source("shapes", "grit", data_dir=str(tmp / "shapes" / "grounded" / "1.0.0"))
    tok, spm = tokenizer(tmp)
    processor = Kosmos2Processor(tok)
    config = ExampleConfig(seq_len=128)
    n = args.examples

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
        records = _tfds_records(source, 0, 0, 1, 0, 1, repeat=False, mark_end=True)
        rate = steady_rate(floor_items(records))
        records.close()
        gc.collect()
        return rate

    def pipeline_rate():
        pipe = Pipeline([source], processor, config, batch_size=16, seed=0, repeat=False, num_workers=args.workers,
                        examples_per_task=args.examples_per_task)
        rate = steady_rate(len(b["input_ids"]) for b in pipe)
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
        print(f"round {i + 1}: floor {floor:.0f} ex/s, whole pipeline {full:.0f} ex/s, {full / floor:.0%}; "
              f"first item after {floor_start:.2f} s / {full_start:.2f} s; "
              f"CPU {floor_cpu:.2f} / {full_cpu:.2f} ms per example", flush=True)
    floor, floor_start, floor_cpu, full, full_start, full_cpu = (float(v) for v in np.median(rounds, axis=0))
    ratio = float(np.median([r[3] / r[0] for r in rounds]))
    cpu_ratio = float(np.median([r[2] / r[5] for r in rounds]))
    print(f"{n} shapes records (128 px PNG -> 224 px), seq_len 128, {args.workers} threads, "
          f"{os.cpu_count()} cores, tokenizer {os.path.basename(spm)}, {args.rounds} rounds")
    print("| stage | examples/s (steady, median) | first item after (median) | CPU per example (median) |")
    print("|---|---|---|---|")
    print(f"| decode + resize only (floor) | {floor:.0f} | {floor_start:.2f} s | {floor_cpu:.2f} ms |")
    print(f"| whole pipeline | {full:.0f} | {full_start:.2f} s (fills the 1024-record shuffle buffer) "
          f"| {full_cpu:.2f} ms |")
    print(f"whole / floor = {ratio:.0%} (median of the per-round ratios; target >= 80%); "
          f"by CPU time per example {cpu_ratio:.0%}")


if __name__ == "__main__":
    main()
