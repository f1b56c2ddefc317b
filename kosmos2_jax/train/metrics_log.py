"""WORKDIR/metrics.jsonl: the run's numbers, machine-readable, one JSON object a line:
`{"step": 120, "kind": "train", "loss": ..., "lr": ..., "tokens_per_s": ..., "step_time": ...}` for
each logged train step, `"kind": "val"` for a validation, `"eval/NAME"` for an evaluation during
training, `"train/source/NAME"` for a source's line of a mixture. Written by process 0 as the run
goes (appended locally; rewritten whole on an object store such as gs://, which cannot append). A
resumed run first drops the lines after the step it resumes from (they are logged again), so each
step appears once however often the run was stopped."""

from __future__ import annotations

import json
import math
import os

FILE = "metrics.jsonl"


def _is_remote(path: str) -> bool:
    return "://" in path


def read(workdir: str) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl ([] when there is none)."""
    path = os.path.join(workdir, FILE)
    if _is_remote(path):
        from tensorflow.io import gfile

        if not gfile.exists(path):
            return []
        with gfile.GFile(path) as f:
            text = f.read()
    elif os.path.isfile(path):
        with open(path) as f:
            text = f.read()
    else:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a kill mid-write
            continue
    return records


class MetricsLog:
    def __init__(self, workdir: str, start: int):
        self.path = os.path.join(workdir, FILE)
        self.records = [r for r in read(workdir) if r.get("step", 0) <= start]
        self._rewrite()

    def write(self, kind: str, values: dict, step: int) -> None:
        record = {"step": int(step), "kind": kind}
        for k, v in values.items():
            if k != "step":
                v = float(v)
                record[k] = v if math.isfinite(v) else str(v)  # JSON has no nan or inf
        self.records.append(record)
        if _is_remote(self.path):
            self._rewrite()
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _rewrite(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        if _is_remote(self.path):
            from tensorflow.io import gfile

            with gfile.GFile(self.path, "w") as f:
                f.write(text)
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)
