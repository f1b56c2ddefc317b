"""Outputs that a failed or killed command cannot damage, and resumes that cannot mix inputs.

- `atomic_dir(path)` / `atomic_file(path)`: write into a temporary sibling (`PATH.partial`) and
  rename it onto `path` only when everything was written. An existing `path` is moved to
  `PATH.replaced` for the instant between the two renames and deleted after; if a kill lands in
  that instant, the next `atomic_dir` on the same path puts it back first.
- `refuse_existing(path, overwrite, flag)`: a non-empty output that the command would not resume
  is refused unless `--overwrite` is given (then it is replaced whole, never merged).
- `fingerprint(path)`: a cheap content identity of a checkpoint / tokenizer / data file for keyed
  resumes; `listing_fingerprint(folder)`: by file names and sizes only; `key_differences(a, b)`
  names what differs between two keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time

from kosmos2_jax.utils.errors import UsageError


# Tests set this to pause (in seconds) before an output is committed, to kill a command mid-write.
_PAUSE_ENV = "KOSMOS2_TEST_PAUSE_BEFORE_COMMIT"


def _pause_before_commit() -> None:
    if os.environ.get(_PAUSE_ENV):
        print(f"about to commit (pausing {os.environ[_PAUSE_ENV]} s)", flush=True)
        time.sleep(float(os.environ[_PAUSE_ENV]))


def is_nonempty(path: str) -> bool:
    return os.path.isfile(path) or (os.path.isdir(path) and bool(os.listdir(path)))


def refuse_existing(path: str, overwrite: bool, what: str = "--out") -> None:
    """A UsageError when `path` holds something and `overwrite` is False."""
    recover(path)
    if not overwrite and is_nonempty(path):
        kind = "folder" if os.path.isdir(path) else "file"
        raise UsageError(f"{what} {path!r} is an existing non-empty {kind}; pass --overwrite to replace it "
                         f"(nothing has been changed)")


def recover(path: str) -> None:
    """Undo a replacement a kill interrupted (`path` moved aside, the new one not yet in place)."""
    old = path.rstrip("/") + ".replaced"
    if os.path.exists(old) and not os.path.exists(path):
        os.rename(old, path)
    elif os.path.exists(old):
        _remove(old)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def commit(tmp: str, path: str) -> None:
    """Move the finished `tmp` onto `path`, replacing what was there."""
    _pause_before_commit()
    old = path.rstrip("/") + ".replaced"
    if os.path.lexists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    if os.path.lexists(old):
        _remove(old)


@contextlib.contextmanager
def atomic_dir(path: str, primary: bool = True):
    """Yields a temporary sibling folder to fill; it replaces `path` when the block succeeds and is
    deleted when it fails. With several processes writing one folder (`primary` False on all but
    one), the caller synchronizes them around the block; only the primary moves folders."""
    path = os.path.abspath(path)
    tmp = path.rstrip("/") + ".partial"
    if primary:
        recover(path)
        _remove(tmp)  # what a killed earlier attempt left
        os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        if primary:
            _remove(tmp)
        raise
    if primary:
        commit(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
    """Yields an open file; it replaces `path` only when the block succeeds."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
    except BaseException:
        _remove(tmp)
        raise
    _pause_before_commit()
    os.replace(tmp, path)


def write_json(path: str, obj, **kwargs) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, **kwargs)


# --- keyed resumes ---------------------------------------------------------------------------------
_EDGE = 1 << 16
# Orbax's bookkeeping: a save time and an absolute path, not content (the same params written
# twice, or a moved folder, must keep their fingerprint)
BOOKKEEPING = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})


def fingerprint(path: str) -> str:
    """A content identity of a file or folder: every file's relative path and size, its first and
    last 64 KiB, hashed (16 hex digits); Orbax's bookkeeping files are left out. Cheap on a 6 GB
    checkpoint, and two checkpoints of one run at different steps differ (their tensors' bytes
    differ)."""
    h = hashlib.sha256()
    path = os.path.abspath(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names if name not in BOOKKEEPING)
    for name in files:
        size = os.path.getsize(name)
        h.update(f"{os.path.relpath(name, path)}\0{size}\0".encode())
        with open(name, "rb") as f:
            h.update(f.read(_EDGE))
            if size > 2 * _EDGE:
                f.seek(-_EDGE, os.SEEK_END)
                h.update(f.read(_EDGE))
            elif size > _EDGE:
                h.update(f.read())
    return h.hexdigest()[:16]


def listing_fingerprint(path: str) -> str:
    """A cheap identity of a folder's files by name and size only: "N files, B bytes, HASH"."""
    h, count, total = hashlib.sha256(), 0, 0
    path = os.path.abspath(path)
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            size = os.path.getsize(full)
            count, total = count + 1, total + size
            h.update(f"{os.path.relpath(full, path)}\0{size}\0".encode())
    return f"{count} files, {total} bytes, {h.hexdigest()[:16]}"


def key_differences(saved: dict, wanted: dict) -> list[str]:
    """`name: saved -> wanted` for every entry that differs."""
    return [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(saved) | set(wanted))
            if saved.get(k) != wanted.get(k)]
