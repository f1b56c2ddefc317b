"""Reading captioned images and writing grounded records.

Inputs (`read_inputs`):
- record files `*.jsonl` / `*.parquet` with at least `key` and `caption` (other columns kept when
  they are `url`, `width`, `height`); this includes the released GRIT-20M Parquet files, whose
  `noun_chunks` / `ref_exps` are ignored (they are recomputed). Images come from `images/{key}.jpg`
  (or .png / .jpeg / .webp) beside the record files, or from the folder given as `images`;
- img2dataset webdataset shards `*.tar` holding `{key}.jpg` + `{key}.json` (+ `{key}.txt`).

Output layout (what `data/grit` reads):

    OUT/records-00000.parquet ...  key, caption, url, width, height, noun_chunks, ref_exps
    OUT/images/{key}.jpg | .png    the image bytes as they came in (other formats re-encoded to PNG)
    OUT/stats.json                 stage counters
"""

from __future__ import annotations

import collections
import glob
import io
import json
import os
import tarfile
from typing import Iterator

IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".webp")

RECORD_COLUMNS = ("key", "caption", "url", "width", "height", "noun_chunks", "ref_exps")


def iter_record_files(root: str) -> Iterator[dict]:
    """Rows of `root/*.jsonl` then `root/*.parquet` (or of `root` itself when it is such a file)."""
    paths = [root] if os.path.isfile(root) else sorted(glob.glob(os.path.join(root, "*.jsonl"))) + \
        sorted(glob.glob(os.path.join(root, "*.parquet")))
    for path in paths:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            yield from pq.read_table(path).to_pylist()
        else:
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except ValueError as e:
                            raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
                        if not isinstance(record, dict):
                            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
                        yield record


def iter_tar_records(root: str) -> Iterator[dict]:
    """img2dataset webdataset shards: one dict per key, its `.json` fields plus `_image` bytes."""
    paths = [root] if os.path.isfile(root) and root.endswith(".tar") else \
        sorted(glob.glob(os.path.join(root, "*.tar"))) if os.path.isdir(root) else []
    for path in paths:
        members = collections.defaultdict(dict)
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    key, ext = os.path.splitext(m.name)
                    members[key][ext.lstrip(".")] = tar.extractfile(m).read()
        for key, parts in sorted(members.items()):
            meta = json.loads(parts["json"]) if "json" in parts else {}
            meta.setdefault("key", os.path.basename(key))
            if "caption" not in meta and "txt" in parts:
                meta["caption"] = parts["txt"].decode("utf-8", "replace")
            meta["_image"] = parts.get("jpg") or parts.get("png") or parts.get("jpeg") or parts.get("webp") or b""
            yield meta


def find_image(folder: str, key: str) -> str | None:
    for ext in IMAGE_EXTENSIONS:
        path = os.path.join(folder, key + ext)
        if os.path.isfile(path):
            return path
    return None


def read_inputs(source: str, images: str = "") -> Iterator[dict]:
    """Captioned images as dicts: key, caption, url, width, height, image (bytes, b"" when missing)."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"input {source!r} does not exist")
    base = source if os.path.isdir(source) else os.path.dirname(source)
    folder = images or os.path.join(base, "images")
    rows = list(iter_record_files(source)) if not source.endswith(".tar") else []
    for row in rows:
        key = str(row.get("key", ""))
        path = find_image(folder, key) if key else None
        data = open(path, "rb").read() if path else b""
        yield _input(row, key, data)
    for row in iter_tar_records(source):
        yield _input(row, str(row.get("key", "")), row.pop("_image", b""))


def _input(row: dict, key: str, data: bytes) -> dict:
    return {"key": key, "caption": row.get("caption") if isinstance(row.get("caption"), str) else "",
            "url": str(row.get("url") or ""), "width": int(row.get("width") or 0),
            "height": int(row.get("height") or 0), "image": data or b""}


def image_file(data: bytes, image) -> tuple[bytes, str]:
    """(bytes, extension) to store: JPEG and PNG as they came, anything else re-encoded to PNG."""
    fmt = (image.format or "").upper()
    if fmt in ("JPEG", "PNG"):
        return data, ".jpg" if fmt == "JPEG" else ".png"
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), ".png"


def arrow_schema():
    import pyarrow as pa

    rows = pa.list_(pa.list_(pa.float64()))
    return pa.schema([("key", pa.string()), ("caption", pa.string()), ("url", pa.string()), ("width", pa.int64()),
                      ("height", pa.int64()), ("noun_chunks", rows), ("ref_exps", rows)])


def write_parquet(records: list[dict], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{k: r[k] for k in RECORD_COLUMNS} for r in records], schema=arrow_schema())
    pq.write_table(table, path)


def read_records(out_dir: str) -> list[dict]:
    """All records of a build's Parquet shards, sorted by key."""
    import pyarrow.parquet as pq

    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*.parquet"))):
        rows.extend(pq.read_table(path).to_pylist())
    return sorted(rows, key=lambda r: r["key"])
