"""Run predictions over evaluation items with a progress line and a JSONL stream: every finished
item is appended (and flushed) to `predictions.jsonl`, so an interrupted evaluation resumes where
it stopped and never recomputes a finished item."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Sequence


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
                done[str(record["id"])] = record
    return done


def run_items(items: Sequence[dict], predict_batch: Callable[[list], list], jsonl: str, batch_size: int,
              log=sys.stderr) -> list[dict]:
    """items: dicts with a unique `id`. predict_batch(items) -> one JSON-able record per item.
    Returns the records of all items, in item order."""
    done = load_done(jsonl)
    todo = [it for it in items if str(it["id"]) not in done]
    if done and log:
        print(f"resuming: {len(items) - len(todo)} of {len(items)} items already in {jsonl}", file=log)
    os.makedirs(os.path.dirname(os.path.abspath(jsonl)), exist_ok=True)
    start = time.time()
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
                print(f"\r{len(items) - len(todo) + n}/{len(items)} items, ETA {int(eta)}s", end="", file=log, flush=True)
    if log and todo:
        print(file=log)
    return [done[str(it["id"])] for it in items]


def run_shared(items: Sequence[dict], predict_batch: Callable[[list], list], jsonl: str, batch_size: int,
               log=sys.stderr) -> list[dict]:
    """`run_items` over several processes (collective): the items are cut into batches as one
    process would cut them and the batches dealt out round-robin (`multihost.batch_share`), each
    process streaming its share to `JSONL-STEM.process_P-of-N.jsonl`; every process returns all
    records, in item order. With one process it is `run_items` on `jsonl`."""
    import jax

    from kosmos2_jax import multihost

    if jax.process_count() == 1:
        return run_items(items, predict_batch, jsonl, batch_size, log)
    share = multihost.batch_share(len(items), batch_size)
    stem = os.path.splitext(jsonl)[0]
    part = f"{stem}.process_{jax.process_index()}-of-{jax.process_count()}.jsonl"
    mine = run_items([items[i] for i in share], predict_batch, part, batch_size, log if multihost.is_primary() else None)
    return multihost.merge_shares(multihost.allgather_json(mine), len(items), batch_size)
