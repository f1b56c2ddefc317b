"""The input pipeline: tfds splits (and text files) -> per-host shards -> a seeded mixture ->
examples (decode, resize/crop, span selection, grounded-or-plain, ids, masks) -> batches.

    pipe = Pipeline([Source("shapes", "grit", data_dir="~/tensorflow_datasets/shapes/grounded/1.0.0")],
                    processor, ExampleConfig(seq_len=128), batch_size=16, seed=0)
    batch = next(pipe)            # dict of numpy arrays, leading dim = per-host batch
    state = pipe.state()          # JSON-able; Pipeline(..., state=state) resumes exactly there

Every row has `source_ids` ([L], the 1-based index of the source its token came from, 0 on
padding): the trainer's per-source loss and counts. With `pack=True` several examples share a
row (`packing.py`: `segment_ids`, per-row `pixel_values` [pack_max_images, S, S, 3]); an example
that no longer fits opens the next row, and a saved state replays it.

Determinism: each source reads its host's shard in a fixed order (file order, then a seeded
shuffle buffer, repeated), and the example at global index i draws its source and its own random
choices from `ExampleRandom(seed, i, stream)`. So the stream is a pure function of the
seed and the state `{index, per-source positions, bad counts}`; restoring replays record reads
(`skip`), not decoding. Bad records are skipped and counted by reason; past `max_bad_fraction`
(after `min_records_for_bad_check` records) the pipeline stops with an error.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import queue
import threading
import weakref
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from kosmos2_jax.data.examples import (BadRecord, ExampleConfig, bad_record_or, grit_examples,
                                       grit_instruction_example, language_instruction_example, llava_example,
                                       text_example)
from kosmos2_jax.data.example_random import ExampleRandom
from kosmos2_jax.data.annotations import ANNOTATION_KINDS
from kosmos2_jax.data.instruct import LANGUAGE_INSTRUCTION_KINDS
from kosmos2_jax.data.interleaved import interleaved_chunks, interleaved_example
from kosmos2_jax.data.packing import example_length, fits, pack_row
from kosmos2_jax.format.processor import Kosmos2Processor
from kosmos2_jax.utils.errors import UsageError

SOURCE_KINDS = ("grit", "caption", "text", "grit_instruct", "llava", "interleaved", *LANGUAGE_INSTRUCTION_KINDS,
                *ANNOTATION_KINDS)
RECORD_KINDS = ("grit", "caption", "grit_instruct")  # read from a prepared tfds folder (`data_dir`); the others from `path`


@dataclasses.dataclass(frozen=True)
class Source:
    """`grit`: a prepared tfds dataset folder (`tfds.builder_from_directory`) with GRIT-schema
    records. `caption`: the same kind of folder read as plain image-caption pairs, never grounded
    (LAION/COYO img2dataset output built with `data/grit`, or GRIT itself). `text`: a text file,
    one example per line. `grit_instruct`: GRIT-schema records turned into grounded instructions
    (Table 9). `llava`: a LLaVA-Instruct JSON file (`path`) with its
    images in `data_dir`. `flan`, `unnatural_instructions`: text-only instructions, a JSONL file
    (`path`) in the released format (`data/instruct.py`). `interleaved`: MMC4 or OBELICS documents,
    a JSONL file or a folder of them (`path`), images in `data_dir` (`data/interleaved.py`; packed
    rows only). `coco`, `odvg`, `refexp`: box annotations (a COCO detection JSON, Grounding DINO's
    ODVG JSONL, referring expressions in JSONL) at `path`, images in `data_dir`, made into GRIT
    records (`data/annotations.py`)."""

    name: str
    kind: str
    data_dir: str = ""
    split: str = "train"
    weight: float = 1.0
    path: str = ""

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise UsageError(f"source {self.name!r}: kind {self.kind!r} not in {SOURCE_KINDS}")


def split_size(data_dir: str, split: str) -> int | None:
    """The record count of a prepared tfds folder's split (its dataset_info.json), None if unknown."""
    try:
        with open(os.path.join(os.path.expanduser(data_dir), "dataset_info.json")) as f:
            splits = {s["name"]: s for s in json.load(f).get("splits", [])}
        return sum(int(n) for n in splits[split]["shardLengths"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


END_OF_SPLIT = object()  # yielded by `_numpy_records(..., mark_end=True)` before tf.data teardown


def _tfds_records(source: Source, seed: int, process_index: int, process_count: int, skip: int,
                  shuffle_buffer: int, repeat: bool, mark_end: bool = False):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    tf.config.set_visible_devices([], "GPU")  # the input pipeline never takes accelerator memory
    path = os.path.expanduser(source.data_dir)
    try:
        builder = tfds.builder_from_directory(path)
    except Exception as e:  # tfds raises several types for a missing or unprepared folder
        raise FileNotFoundError(f"source {source.name!r}: no prepared tfds dataset at {path!r} "
                                f"(build it with python -m kosmos2_jax.data.build): {e}") from None
    if source.split not in builder.info.splits:
        raise UsageError(f"source {source.name!r}: split {source.split!r} not in {list(builder.info.splits)}")
    split = tfds.split_for_jax_process(source.split, process_index=process_index, process_count=process_count)
    options = tf.data.Options()
    options.deterministic = True
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            read_config=tfds.ReadConfig(interleave_cycle_length=1, options=options))
    if repeat:
        ds = ds.repeat()
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return _numpy_records(ds.skip(skip), 64, mark_end)


def _numpy_records(ds, chunk: int, mark_end: bool = False):
    """Iterate `ds` as numpy dicts, `chunk` records per tf.data step.

    Pulling records one at a time costs ~2 ms each in TF's eager iterator (per tensor, in the
    main thread), which capped the whole pipeline; batching in tf.data and splitting in numpy
    costs a fraction of that. Features with a variable leading dim ([None, 7] boxes) travel
    flattened with their row count. Same records, same order. With `mark_end`, `END_OF_SPLIT`
    follows the last record: leaving this generator tears the tf.data objects down, which was
    seen to take ~2 s under load (a shuffled split), and a consumer should not wait for it.
    """
    import tensorflow as tf

    spec = ds.element_spec
    ragged = [k for k, v in spec.items() if v.shape.rank and v.shape[0] is None]

    def flatten(example):
        out = dict(example)
        for k in ragged:
            out[k] = tf.reshape(example[k], [-1])
            out[f"{k}/rows"] = tf.shape(example[k])[0]
        return out

    if ragged:
        ds = ds.map(flatten)
    inner = {k: tuple(spec[k].shape[1:]) for k in ragged}
    row_size = {k: int(np.prod(inner[k])) for k in ragged}
    # Named, so that the loop's end does not free the iterator (a teardown of up to ~2 s): that
    # happens when this generator is closed, after `END_OF_SPLIT`.
    batches = ds.padded_batch(chunk).prefetch(2).as_numpy_iterator()
    for batch in batches:
        for i in range(len(batch[next(iter(spec))])):
            record = {k: batch[k][i] for k in spec if k not in ragged}
            for k in ragged:
                rows = int(batch[f"{k}/rows"][i])
                record[k] = batch[k][i][:rows * row_size[k]].reshape(rows, *inner[k])
            yield record
    if mark_end:
        yield END_OF_SPLIT


class _Reader:
    """Iterates `records` in a daemon thread, up to `ahead` records in advance, same order.

    The main thread only takes records from a queue: TF's eager iterator, the record splitting and
    the tf.data teardown at the end of a split (after `END_OF_SPLIT`) all happen off the thread
    that hands out work and assembles batches. Records cross the queue `chunk` at a time (one
    lock hand-off per chunk, not per record). Errors raised while reading are re-raised by
    `__next__` after the records read before them.
    """

    def __init__(self, records: Iterator[dict], ahead: int = 256, chunk: int = 16):
        self._queue: queue.Queue = queue.Queue(max(1, ahead // chunk))
        self._chunk = chunk
        self._taken: collections.deque = collections.deque()  # the current chunk, in the consumer
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(records,), daemon=True, name="record-reader")
        self._thread.start()

    def _run(self, records):
        chunk = []
        try:
            for record in records:
                if record is END_OF_SPLIT or self._stop.is_set():
                    break
                chunk.append(record)
                if len(chunk) == self._chunk:
                    self._put(chunk)
                    chunk = []
            self._put(chunk + [END_OF_SPLIT])
            if hasattr(records, "close"):
                records.close()  # the teardown runs here, whoever else still holds `records`
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            self._put(chunk + [e])

    def _put(self, item) -> None:
        while not self._stop.is_set():  # a closed reader drops the item
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        if not self._taken:
            self._taken.extend(self._queue.get())
        item = self._taken.popleft()
        if item is END_OF_SPLIT:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self):
        self._stop.set()


def _text_records(source: Source, process_index: int, process_count: int, skip: int, repeat: bool):
    path = os.path.expanduser(source.path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source {source.name!r}: text file not found: {path!r}")
    if source.kind == "llava":
        from kosmos2_jax.data.instruct import load_llava

        lines = load_llava(path)
    elif source.kind in LANGUAGE_INSTRUCTION_KINDS:
        from kosmos2_jax.data.instruct import load_language_instructions

        lines = load_language_instructions(path, source.kind)
    elif source.kind in ANNOTATION_KINDS:
        from kosmos2_jax.data.annotations import load_items

        lines = load_items(path, source.kind, os.path.expanduser(source.data_dir))
    else:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    lines = lines[process_index::process_count]
    if not lines:
        raise UsageError(f"source {source.name!r}: no lines for host {process_index} of {process_count}")

    def gen():
        i = skip
        while repeat or i < len(lines):
            line = lines[i % len(lines)]
            if source.kind in ANNOTATION_KINDS:  # the image is read as the record is
                from kosmos2_jax.data.annotations import with_image

                line = with_image(line, os.path.expanduser(source.data_dir))
            yield line
            i += 1
    return gen()


class Pipeline:
    """An iterator of batches (dicts of numpy arrays, `batch_size` rows per host)."""

    def __init__(self, sources: Sequence[Source], processor: Kosmos2Processor, config: ExampleConfig,
                 batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1,
                 state: dict | None = None, shuffle_buffer: int = 1024, repeat: bool = True,
                 max_bad_fraction: float = 0.05, min_records_for_bad_check: int = 200, num_workers: int = 4,
                 pack: bool = False, pack_max_images: int = 4, examples_per_task: int = 8):
        if not sources:
            raise UsageError("a pipeline needs at least one source")
        if pack and pack_max_images < 1:
            raise UsageError(f"packing needs pack_max_images >= 1, got {pack_max_images}")
        self.sources = list(sources)
        self.processor, self.config = processor, config
        self._caption_config = dataclasses.replace(config, grounded_prob=0.0)  # `caption`: never grounded
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.max_bad_fraction, self.min_records = max_bad_fraction, min_records_for_bad_check
        weights = np.asarray([s.weight for s in self.sources], np.float64)
        if np.any(weights < 0) or weights.sum() <= 0:
            raise UsageError(f"source weights must be >= 0 with a positive sum, got {weights.tolist()}")
        self._cumulative = np.cumsum(weights / weights.sum())
        self._source_number = {src.name: i + 1 for i, src in enumerate(self.sources)}  # `source_ids`; 0: padding
        state = state or {}
        self._index = int(state.get("index", 0))
        self._positions = {s.name: int(state.get("positions", {}).get(s.name, 0)) for s in self.sources}
        self.bad_counts = collections.Counter(state.get("bad_counts", {}))
        self.bad_by_source = collections.Counter(state.get("bad_by_source", {}))  # "source: reason" -> count
        self._records = {}
        for i, s in enumerate(self.sources):
            skip = self._positions[s.name]
            if s.kind == "interleaved":
                if not pack:
                    raise UsageError(f"source {s.name!r}: interleaved documents need packed rows (pack=True; "
                                     f"data.pack in a config): a row holds several of their images")
                self._records[s.name] = _Reader(interleaved_chunks(
                    s.path, processor, config.seq_len, pack_max_images, process_index, process_count, skip, repeat))
            elif s.kind in RECORD_KINDS:
                self._records[s.name] = _Reader(_tfds_records(s, seed + 1000 * i, process_index, process_count,
                                                              skip, shuffle_buffer, repeat, mark_end=True))
            else:
                self._records[s.name] = _text_records(s, process_index, process_count, skip, repeat)
        self._pool = concurrent.futures.ThreadPoolExecutor(num_workers) if num_workers > 1 else None
        # Stops the reader threads and the pool when the pipeline is closed or garbage-collected.
        self._closer = weakref.finalize(self, _shut_down, [r for r in self._records.values() if isinstance(r, _Reader)],
                                        self._pool)
        self._pending: collections.deque = collections.deque()
        self._per_task = max(1, examples_per_task)
        self._lookahead = max(2 * batch_size, 8, 2 * num_workers * self._per_task)
        self._exhausted = False
        self.pack, self.pack_max_images = pack, pack_max_images
        self._carry = None  # (example, source name): read but left for the next packed row

    # --- state ----------------------------------------------------------------------------
    def state(self) -> dict:
        """Where the next batch starts; pass it back as `state=` to resume exactly there."""
        # Work already queued but not yet returned is replayed on restore.
        index = self._index - len(self._pending)
        positions = dict(self._positions)
        for source_name, _, _ in self._pending:
            positions[source_name] -= 1
        if self._carry is not None:  # replayed too: it opens the next packed row
            index -= 1
            positions[self._carry[1]] -= 1
        return {"index": index, "positions": positions, "bad_counts": dict(self.bad_counts),
                "bad_by_source": dict(self.bad_by_source)}

    # --- producing examples ---------------------------------------------------------------
    def _make(self, source: Source, record: Any, index: int) -> dict:
        if source.kind == "text":
            return text_example(record, self.processor, self.config)
        if source.kind == "llava":
            return llava_example(record, os.path.expanduser(source.data_dir), self.processor, self.config)
        if source.kind in LANGUAGE_INSTRUCTION_KINDS:
            return language_instruction_example(record, self.processor, self.config)
        if source.kind == "interleaved":
            return interleaved_example(record, os.path.expanduser(source.data_dir), self.processor, self.config)
        if source.kind in ANNOTATION_KINDS:  # (the good ones are made in `_make_all`)
            raise BadRecord(record["bad"])
        # ("grit" records are made in `_make_all`, several at a time.)
        return grit_instruction_example(record, self.processor, self.config, ExampleRandom(self.seed, index, 1))

    def _submit_next(self) -> bool:
        """Reads the next `examples_per_task` records and queues them as one task: one hand-off
        to the pool per task rather than per example (measured on 2 cores: +9% examples/s at 8
        per task). False when the sources are exhausted."""
        items = []
        while len(items) < self._per_task:
            index = self._index
            choice = 0 if len(self.sources) == 1 else min(
                int(np.searchsorted(self._cumulative, ExampleRandom(self.seed, index, 0).random(), side="right")),
                len(self.sources) - 1)
            source = self.sources[choice]
            try:
                record = next(self._records[source.name])
            except StopIteration:
                break
            self._positions[source.name] += 1
            self._index += 1
            items.append((source, record, index))
        if not items:
            return False
        work = (self._pool.submit(self._make_all, items) if self._pool else _Done(self._make_all(items)))
        for k, (source, _, _) in enumerate(items):
            self._pending.append((source.name, work, k))  # one entry per example: `state()` counts them
        return len(items) == self._per_task

    def _make_all(self, items):
        """One task's examples (or their `BadRecord`s), in order; GRIT-schema records (`grit`, and
        `caption`: the same records as plain image-caption pairs) go through `grit_examples`
        together (their text work first, then the pixels)."""
        made = {}
        for kinds, config in ((("grit", *ANNOTATION_KINDS), self.config), (("caption",), self._caption_config)):
            ks = [k for k, (source, record, _) in enumerate(items) if source.kind in kinds and "bad" not in record]
            if ks:
                made.update(zip(ks, grit_examples([items[k][1] for k in ks], self.processor, config,
                                                  [ExampleRandom(self.seed, items[k][2], 1) for k in ks])))
        return [made[k] if k in made else bad_record_or(self._make, *item) for k, item in enumerate(items)]

    def _next_example(self) -> tuple[dict, str] | None:
        while True:
            while not self._exhausted and len(self._pending) < self._lookahead:
                if not self._submit_next():
                    self._exhausted = True
            if not self._pending:
                return None
            source_name, work, k = self._pending.popleft()
            result = work.result()[k]
            if isinstance(result, BadRecord):
                self.bad_counts[result.reason] += 1
                self.bad_by_source[f"{source_name}: {result.reason}"] += 1
                self._check_bad()
                continue
            result["source_ids"] = result["attention_mask"] * self._source_number[source_name]
            return result, source_name

    def _next_row(self) -> dict | None:
        if not self.pack:
            got = self._next_example()
            return None if got is None else got[0]
        examples, tokens, images = [], 0, 0
        while True:
            got, self._carry = (self._carry, None) if self._carry is not None else (self._next_example(), None)
            if got is None:
                break
            if examples and not fits(tokens, images, got[0], self.config.seq_len, self.pack_max_images):
                self._carry = got
                break
            examples.append(got[0])
            tokens += example_length(got[0])
            images += int(got[0]["has_image"])
        if not examples:
            return None
        return pack_row(examples, self.config.seq_len, self.pack_max_images, self.processor.tokenizer.pad_id)

    def _check_bad(self):
        bad = sum(self.bad_counts.values())
        seen = self._index - len(self._pending)
        if seen >= self.min_records and bad / seen > self.max_bad_fraction:
            raise RuntimeError(f"{bad} of {seen} records were bad ({dict(self.bad_by_source) or dict(self.bad_counts)}), more than "
                               f"max_bad_fraction={self.max_bad_fraction}: check the data")

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        rows = []
        while len(rows) < self.batch_size:
            example = self._next_row()
            if example is None:
                if rows:  # a final partial batch (only without repeat)
                    break
                raise StopIteration
            rows.append(example)
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def close(self):
        self._closer()


def _shut_down(readers, pool):
    for reader in readers:
        reader.close()
    if pool:
        pool.shutdown(wait=False, cancel_futures=True)


class _Done:
    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


class HostShards:
    """This process's share of `shards` host shards of the data: pipelines `make(shard, state)` for
    shards [p * shards / P, (p + 1) * shards / P) of process p of P, their batches concatenated in
    shard order. With one shard per process (the default) it is one pipeline; with more, one
    machine reads the data exactly as a pod of `shards` hosts would. `state()` is one pipeline
    state per shard held here; `states` (all shards', e.g. from a checkpoint) restores them."""

    def __init__(self, make: Callable[[int, dict | None], Pipeline], shards: int,
                 states: Sequence[dict] | None = None, process_index: int | None = None,
                 process_count: int | None = None):
        import jax

        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        if shards % count:
            raise UsageError(f"{shards} data shards do not divide among {count} processes")
        if states is not None and len(states) != shards:
            raise UsageError(f"{len(states)} saved data states for {shards} data shards")
        per = shards // count
        self.shards = list(range(index * per, (index + 1) * per))
        self.pipelines = [make(k, None if states is None else states[k]) for k in self.shards]
        self.batch_size = sum(p.batch_size for p in self.pipelines)

    def state(self) -> list[dict]:
        return [p.state() for p in self.pipelines]

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if len(self.pipelines) == 1:
            return next(self.pipelines[0])
        parts = [next(p) for p in self.pipelines]
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

    def close(self):
        for p in self.pipelines:
            p.close()


def global_batch(batch: dict, sharding) -> dict:
    """Per-host numpy batch -> global jax arrays laid out by `sharding` (a NamedSharding over the
    batch axis), for multi-host training."""
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
