"""Run predictions over evaluation items with a progress line and a JSONL stream: every finished
item is appended (and flushed) to `predictions.jsonl`, so an interrupted evaluation resumes where
it stopped and never recomputes a finished item.

The stream's first line is `{"run_key": {...}}`: what produced it (checkpoint, tokenizer, task,
split, ...). A resume whose key differs is refused, naming the differences, unless `overwrite`
(then the stream starts afresh). A torn last line from a kill is cut off before appending."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Sequence

from kosmos2_jax.utils.errors import UsageError


def load_done(path: str) -> dict:
    """{id: record} of a predictions JSONL (a torn last line from a kill is ignored)."""
    done = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if "id" in record:
                    done[str(record["id"])] = record
    return done


def saved_key(path: str) -> dict | None:
    """The `run_key` header of a predictions JSONL (None: no header, an older stream)."""
    with open(path) as f:
        try:
            first = json.loads(f.readline())
        except ValueError:
            return None
    return first.get("run_key") if isinstance(first, dict) else None


def cut_torn_line(path: str) -> None:
    """Drop a last line without its newline (a kill mid-write), so the next record starts a line."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def check_stream(jsonl: str, key: dict | None, overwrite: bool = False) -> bool:
    """Whether the stream at `jsonl` can be resumed for `key` (False: there is none, or `overwrite`
    lets a run with another key replace it); a UsageError when it holds another run's predictions.
    Changes nothing."""
    from kosmos2_jax.utils.outputs import key_differences

    if not os.path.isfile(jsonl) or key is None:
        return os.path.isfile(jsonl)
    saved = saved_key(jsonl)
    if saved != key and not overwrite:
        why = "; ".join(key_differences(saved, key)) if saved else "it has no run key (an older stream)"
        raise UsageError(f"{jsonl} holds predictions of another run ({why}): pass --overwrite to start "
                         f"afresh, or another --out")
    return saved == key


def open_stream(jsonl: str, key: dict | None, overwrite: bool = False) -> None:
    """Check (`check_stream`) and start the stream at `jsonl` for `key`; `overwrite` deletes one
    of another run."""
    if os.path.isfile(jsonl) and not check_stream(jsonl, key, overwrite):
        os.remove(jsonl)
    os.makedirs(os.path.dirname(os.path.abspath(jsonl)), exist_ok=True)
    if os.path.isfile(jsonl):
        cut_torn_line(jsonl)
    elif key is not None:
        with open(jsonl, "w") as f:
            f.write(json.dumps({"run_key": key}) + "\n")


def run_items(items: Sequence[dict], predict_batch: Callable[[list], list], jsonl: str, batch_size: int,
              log=True, key: dict | None = None, overwrite: bool = False) -> list[dict]:
    """items: dicts with a unique `id`. predict_batch(items) -> one JSON-able record per item.
    Returns the records of all items, in item order. `log`: a file for progress (True: stderr as
    it is at the call, None: quiet)."""
    log = sys.stderr if log is True else log
    open_stream(jsonl, key, overwrite)
    done = load_done(jsonl)
    todo = [it for it in items if str(it["id"]) not in done]
    if done and log:
        print(f"resuming: {len(items) - len(todo)} of {len(items)} items already in {jsonl}", file=log)
    start = time.time()
    terminal = bool(log) and hasattr(log, "isatty") and log.isatty()
    shown = 0  # the tenths of the work reported, when the log is a file (plain lines, not \r updates)
    with open(jsonl, "a") as f:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            for item, record in zip(batch, predict_batch(batch)):
                record = dict(record, id=item["id"])
                f.write(json.dumps(record) + "\n")
                done[str(item["id"])] = record
            f.flush()
            if log:
                n = i + len(batch)
                eta = (len(todo) - n) * (time.time() - start) / n
                line = f"{len(items) - len(todo) + n}/{len(items)} items, ETA {int(eta)}s"
                if terminal:
                    print(f"\r{line}", end="", file=log, flush=True)
                elif 10 * n // len(todo) > shown:
                    shown = 10 * n // len(todo)
                    print(line, file=log, flush=True)
    if terminal and todo:
        print(file=log)
    return [done[str(it["id"])] for it in items]


def run_shared(items: Sequence[dict], predict_batch: Callable[[list], list], jsonl: str, batch_size: int,
               log=True, key: dict | None = None, overwrite: bool = False) -> list[dict]:
    """`run_items` over several processes (collective): the items are cut into batches as one
    process would cut them and the batches dealt out round-robin (`multihost.batch_share`), each
    process streaming its share to `JSONL-STEM.process_P-of-N.jsonl`; every process returns all
    records, in item order. With one process it is `run_items` on `jsonl`."""
    import jax

    from kosmos2_jax.utils import multihost

    if jax.process_count() == 1:
        return run_items(items, predict_batch, jsonl, batch_size, log, key, overwrite)
    share = multihost.batch_share(len(items), batch_size)
    stem = os.path.splitext(jsonl)[0]
    part = f"{stem}.process_{jax.process_index()}-of-{jax.process_count()}.jsonl"
    mine = run_items([items[i] for i in share], predict_batch, part, batch_size,
                     log if multihost.is_primary() else None, key, overwrite)
    return multihost.merge_shares(multihost.allgather_json(mine), len(items), batch_size)
