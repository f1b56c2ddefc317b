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
