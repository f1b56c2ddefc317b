"""GRIT builds in restartable shards: in this process, on any Beam runner, or on a Dask cluster.

A build is a list of shards (`plan`): captions [start, stop) of one input file, `shard_size` each.
One worker builds a shard whole (`build_shard`): its captions are grounded in batches of
`batch_size`, its images written, then `records-NNNNN.parquet` and, last, `stats-NNNNN.json`, each
to a temporary name renamed into place, so a shard is finished exactly when its stats file
exists. The build folder (`OUT.partial` until every shard is finished, then renamed to `OUT`;
remote outputs are built in place) holds `build.json`, the settings and inputs; a build started
again with the same settings skips the finished shards, one with other settings is refused naming
what differs (`--overwrite` starts afresh). The merged `stats.json` is the sum of the shards'
counters, so a restarted build ends with the same records and stats as an uninterrupted one.

Runners (`run`): `local` builds the shards one after another here. Any Beam runner name runs
`Create(shards) | ParDo(build_shard)`; `DirectRunner` is pinned to Beam's in-process FnApiRunner
(Beam's DirectRunner would first try the Prism runner, which downloads a binary). `dask` runs
the same pipeline on Beam's DaskRunner against a dask.distributed cluster (`dask_address`, or a
LocalCluster of `dask_workers` processes here), one shard per partition. The stage counters
travel as the shards' stats files, not as Beam metrics (which the DaskRunner does not have).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import sys
import time

from kosmos2_jax.grit import records as records_lib
from kosmos2_jax.grit.stages import COUNTERS, GritConfig, open_checked, process_batch
from kosmos2_jax.utils.errors import UsageError


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """What a worker needs to build its detector (picklable)."""
    kind: str
    path: str = ""
    tokenizer: str = ""
    device: str = "cpu"
    min_score: float = 0.1
    batch_size: int = 8

    def make(self):
        from kosmos2_jax.grit.detectors import make_detector

        return make_detector(self.kind, self.path, self.tokenizer, self.device, self.min_score, self.batch_size)


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int
    source: str
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """Everything a worker needs to build any shard of one build (picklable)."""
    out: str
    images: str
    config: GritConfig
    detector: DetectorSpec
    spacy_model: str = ""
    batch_size: int = 32
    columns: tuple = ()  # (field, column name) pairs overriding records.COLUMNS


def list_sources(source: str) -> list[str]:
    """The input files of a build (*.jsonl, *.parquet, *.tar), in order."""
    import glob

    if not os.path.exists(source):
        raise FileNotFoundError(f"--input {source!r} does not exist")
    if os.path.isfile(source):
        return [source]
    files = [p for ext in ("*.jsonl", "*.parquet", "*.tar") for p in sorted(glob.glob(os.path.join(source, ext)))]
    if not files:
        raise FileNotFoundError(f"--input {source!r} holds no *.jsonl, *.parquet or *.tar files")
    return files


def plan(sources: list[str], shard_size: int) -> tuple[list[Shard], list[int]]:
    """(the shards, each source's caption count); reads every input once (a malformed JSON line is
    an error here, before any work)."""
    shards, counts = [], []
    for source in sources:
        n = records_lib.count_inputs(source)
        counts.append(n)
        for start in range(0, n, shard_size):
            shards.append(Shard(len(shards), source, start, min(start + shard_size, n)))
    return shards, counts


def settings(spec: BuildSpec, sources: list[str], counts: list[int], shard_size: int) -> dict:
    """What a build's records depend on, as `build.json` keeps it (flat, for naming differences)."""
    c = spec.config
    lemmas = hashlib.sha256("\n".join(sorted(c.abstract_lemmas)).encode()).hexdigest()[:16]
    detector = spec.detector
    out = {"inputs": [f"{os.path.abspath(s)} ({n} captions, {os.path.getsize(s)} bytes)"
                      for s, n in zip(sources, counts)],
           "images": os.path.abspath(spec.images), "shard_size": shard_size, "columns": dict(spec.columns),
           "nms_iou": c.nms_iou, "score_threshold": c.score_threshold, "keep_contained": c.keep_contained,
           "abstract_lemmas": lemmas, "detector": detector.kind, "min_detector_score": detector.min_score,
           "detector_path": _identity(detector.path), "tokenizer": _identity(detector.tokenizer),
           "spacy_model": spec.spacy_model or "default"}
    return json.loads(json.dumps(out))  # the form it has when read back


def _identity(path: str) -> str:
    from kosmos2_jax.utils.outputs import fingerprint

    return f"{os.path.abspath(path)} ({fingerprint(path)})" if path and os.path.exists(path) else path


# --- one shard ------------------------------------------------------------------------------------
def records_name(index: int) -> str:
    return f"records-{index:05d}.parquet"


def stats_name(index: int) -> str:
    return f"stats-{index:05d}.json"


_PAUSE_ENV = "KOSMOS2_TEST_PAUSE_AFTER_SHARD"  # tests: seconds to wait after each shard, to kill a build between two
_TOOLS: dict = {}  # (detector spec, spaCy model) -> (nlp, detector): each worker process loads them once


def _tools(spec: BuildSpec):
    key = (spec.detector, spec.spacy_model)
    if key not in _TOOLS:
        from kosmos2_jax.grit.text import load_spacy

        _TOOLS[key] = (load_spacy(spec.spacy_model), spec.detector.make())
    return _TOOLS[key]


def build_shard(spec: BuildSpec, shard: Shard, timings=None) -> dict:
    """Build `shard` into `spec.out` (nothing to do when its stats file exists) -> its counters.
    The next batch is read and its images decoded in a thread while the detector runs on this one.
    `timings` (a Counter), when given, gains the busy seconds of each stage: read, decode (those two
    in the read-ahead thread), text, detect, select, write (`benchmarks/grit_build.py`)."""
    from apache_beam.io.filesystems import FileSystems

    stats_path = FileSystems.join(spec.out, stats_name(shard.index))
    if FileSystems.exists(stats_path):
        return json.loads(_read(stats_path))
    nlp, detector = _tools(spec)
    counters, built = collections.Counter(), []
    columns = dict(spec.columns) or None

    timings = collections.Counter() if timings is None else timings
    clock = time.perf_counter

    batch: list = []

    def ground():
        found, c = process_batch(batch, nlp, detector, spec.config, timings)
        counters.update(c)
        t = clock()
        for r in found:
            with FileSystems.create(FileSystems.join(spec.out, "images", r["key"] + r["image_ext"])) as f:
                f.write(r["image_bytes"])
        built.extend({k: r[k] for k in records_lib.RECORD_COLUMNS} for r in found)
        timings["write"] += clock() - t

    items = records_lib.read_inputs(shard.source, spec.images, shard.start, shard.stop, columns)

    def read_ahead():
        """The next batch, read and its images decoded (in a thread, while the detector runs)."""
        t = clock()
        ahead = list(itertools.islice(items, spec.batch_size))
        timings["read"] += clock() - t
        t = clock()
        for item in ahead:
            item["opened"] = open_checked(item["image"], spec.config)
        timings["decode"] += clock() - t
        return ahead

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grit-read") as pool:
        pending = pool.submit(read_ahead)
        while batch := pending.result():
            pending = pool.submit(read_ahead)
            ground()
    t = clock()
    records_path = FileSystems.join(spec.out, records_name(shard.index))
    _write_atomic(records_path, records_lib.parquet_bytes(built))
    stats = {k: int(v) for k, v in counters.items()}
    _write_atomic(stats_path, json.dumps(stats).encode())
    timings["write"] += clock() - t
    return stats


def _read(path: str) -> bytes:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        return f.read()


def _write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name, then rename: a reader (or a restart) never sees half a file."""
    from apache_beam.io.filesystems import FileSystems

    tmp = f"{path}.tmp-{os.getpid()}"
    with FileSystems.create(tmp) as f:
        f.write(data)
    FileSystems.rename([tmp], [path])


# --- the whole build ------------------------------------------------------------------------------
def merged_stats(spec: BuildSpec, shards: list[Shard]) -> dict:
    """The shards' counters summed, in pipeline order (zeros included), then any others."""
    from apache_beam.io.filesystems import FileSystems

    total = collections.Counter()
    for shard in shards:
        total.update(json.loads(_read(FileSystems.join(spec.out, stats_name(shard.index)))))
    out = {k: int(total.get(k, 0)) for k in COUNTERS}
    out.update({k: int(v) for k, v in sorted(total.items()) if k not in out})
    return out


def finished(spec: BuildSpec, shards: list[Shard]) -> list[Shard]:
    from apache_beam.io.filesystems import FileSystems

    return [s for s in shards if FileSystems.exists(FileSystems.join(spec.out, stats_name(s.index)))]


def run(spec: BuildSpec, shards: list[Shard], runner: str = "local", beam_args: tuple = (),
        dask_address: str = "", dask_workers: int = 2) -> None:
    """Build every shard of `shards` not finished yet, on `runner`."""
    done = {s.index for s in finished(spec, shards)}
    todo = [s for s in shards if s.index not in done]
    print(f"{len(shards)} shards: {len(done)} finished earlier (skipped), {len(todo)} to build on {runner}",
          file=sys.stderr, flush=True)
    if not todo:
        return
    if runner == "local":
        start = time.time()
        pause = float(os.environ.get(_PAUSE_ENV, 0) or 0)
        for k, shard in enumerate(todo, 1):
            stats = build_shard(spec, shard)
            print(f"shard {shard.index + 1}/{len(shards)} done: {stats.get('captions_in', 0)} captions, "
                  f"{stats.get('written', 0)} records ({k}/{len(todo)} this run, {time.time() - start:.0f} s)",
                  file=sys.stderr, flush=True)
            time.sleep(pause)
        return
    if runner == "dask":
        _run_dask(spec, todo, beam_args, dask_address, dask_workers)
    else:
        _run_beam(spec, todo, beam_runner(runner), beam_args)


def beam_runner(name: str):
    """A Beam runner instance for `name`; DirectRunner is Beam's in-process FnApiRunner, never Prism."""
    if name == "DirectRunner":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    from apache_beam.runners.runner import create_runner

    try:
        return create_runner(name)
    except ValueError as e:
        valid = str(e).split("Valid values are ")[-1].split(" or the fully")[0]
        raise UsageError(f"--runner {name!r}: not local, dask (Beam's DaskRunner on a Dask cluster), or a Beam "
                         f"runner ({valid})") from None


def _build_shards(pipeline, spec: BuildSpec, todo: list[Shard], reshuffle: bool):
    import apache_beam as beam

    class BuildShards(beam.DoFn):
        def process(self, shard):
            yield build_shard(spec, shard)

    shards = pipeline | "Shards" >> beam.Create(todo)
    if reshuffle:  # spread the shards over the workers (Create may hand them all to one)
        shards = shards | "Reshuffle" >> beam.Reshuffle()
    return shards | "Build" >> beam.ParDo(BuildShards())


def _run_beam(spec: BuildSpec, todo: list[Shard], runner, beam_args) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    with beam.Pipeline(runner=runner, options=PipelineOptions(list(beam_args))) as pipeline:
        _build_shards(pipeline, spec, todo, reshuffle=True)


def _run_dask(spec: BuildSpec, todo: list[Shard], beam_args, address: str, workers: int) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.dask.dask_runner import DaskRunner
    from distributed import LocalCluster

    cluster = None
    if not address:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        address = cluster.scheduler_address
    try:
        # one shard per dask.Bag partition, so the shards spread over the workers
        args = ["--dask_client_address", address, "--dask_partition_size", "1", *beam_args]
        with beam.Pipeline(runner=DaskRunner(), options=PipelineOptions(args)) as pipeline:
            _build_shards(pipeline, spec, todo, reshuffle=False)
    finally:
        if cluster is not None:
            cluster.close()


# --- the output folder ----------------------------------------------------------------------------
def build_folder(spec: BuildSpec, input_path: str, shard_size: int, overwrite: bool = False, runner: str = "local",
                 beam_args: tuple = (), dask_address: str = "", dask_workers: int = 2) -> dict:
    """Plan, build (resuming a matching unfinished build) and commit `spec.out` -> its merged stats."""
    from apache_beam.io.filesystems import FileSystems

    from kosmos2_jax.utils import outputs

    sources = list_sources(input_path)
    shards, counts = plan(sources, shard_size)
    wanted = settings(spec, sources, counts, shard_size)
    remote = "://" in spec.out
    out = spec.out if remote else os.path.abspath(spec.out)
    folder = out if remote else out + ".partial"
    if not remote:
        outputs.recover(out)
        if not overwrite and _manifest(out) == wanted and os.path.isfile(os.path.join(out, "stats.json")):
            print(f"{out} is already built with these settings: nothing to do", file=sys.stderr, flush=True)
            return json.loads(_read(os.path.join(out, "stats.json")))
        if not overwrite and outputs.is_nonempty(out):
            raise UsageError(_refusal(f"--out {out!r}", _manifest(out), wanted))
    saved = _manifest(folder)
    if saved is not None and saved != wanted and not overwrite:
        raise UsageError(_refusal(f"the unfinished build {folder!r}", saved, wanted))
    if overwrite or (saved is None and FileSystems.exists(folder)):
        if not remote:
            outputs._remove(folder)
        elif FileSystems.exists(folder):
            if not overwrite:
                raise UsageError(f"--out {folder!r} holds something that is not a build: pass --overwrite to replace it")
            FileSystems.delete([folder])
        saved = None
    if saved is None:
        _write_atomic(FileSystems.join(folder, "build.json"), json.dumps(wanted, indent=2).encode())
    spec = dataclasses.replace(spec, out=folder)
    run(spec, shards, runner, beam_args, dask_address, dask_workers)
    done = {s.index for s in finished(spec, shards)}
    missing = [s.index for s in shards if s.index not in done]
    if missing:
        raise RuntimeError(f"shards {missing[:10]} were not built (the runner finished without them)")
    stats = merged_stats(spec, shards)
    _write_atomic(FileSystems.join(folder, "stats.json"), json.dumps(stats, indent=2).encode())
    if not remote:
        outputs.commit(folder, out)
    print(f"built {out}: {len(shards)} shards", file=sys.stderr, flush=True)
    return stats


def _manifest(folder: str) -> dict | None:
    from apache_beam.io.filesystems import FileSystems

    path = FileSystems.join(folder, "build.json")
    return json.loads(_read(path)) if FileSystems.exists(path) else None


def _refusal(what: str, saved: dict | None, wanted: dict) -> str:
    from kosmos2_jax.utils.outputs import key_differences

    if saved is None:
        return f"{what} is an existing non-empty folder, not a build: pass --overwrite to replace it (nothing has been changed)"
    return (f"{what} was built with other settings ({'; '.join(key_differences(saved, wanted))}): pass --overwrite "
            f"to start afresh (nothing has been changed)")
