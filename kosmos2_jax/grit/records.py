"""Reading captioned images and writing grounded records.

Inputs (`read_inputs`):
- record files `*.jsonl` / `*.parquet` with a key and a caption (other columns kept when they are
  `url`, `width`, `height`); this includes the released GRIT-20M Parquet files, whose
  `noun_chunks` / `ref_exps` are ignored (they are recomputed), and the paper's sources' metadata
  as published: COYO-700M (`id, url, text, width, height, ...`) and LAION-2B (`URL, TEXT, WIDTH,
  HEIGHT, hash, ...`). Columns are found by name, case-insensitively (`COLUMNS`: the key is the
  first of key / id / sample_id / hash, the caption of caption / text), or named by `columns`.
  Images come from `images/{key}.jpg` (or .png / .jpeg / .webp) beside the record files, or from
  the folder given as `images`;
- img2dataset webdataset shards `*.tar` holding `{key}.jpg` + `{key}.json` (+ `{key}.txt`).

Output layout (what `data/grit` reads):

    OUT/records-00000.parquet ...  key, caption, url, width, height, noun_chunks, ref_exps
    OUT/images/{key}.jpg | .png    the image bytes as they came in (other formats re-encoded to PNG)
    OUT/stats.json                 stage counters (the sum of the shards' stats-NNNNN.json)
    OUT/build.json                 the build's settings and inputs (grit/engine.py)
"""

from __future__ import annotations

import collections
import glob
import io
import itertools
import json
import os
import tarfile
from typing import Iterator

from kosmos2_jax.utils.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".webp")
# an input field -> the column names it is read from, first found wins (lower-cased)
COLUMNS = {"key": ("key", "id", "sample_id", "hash"), "caption": ("caption", "text"), "url": ("url",),
           "width": ("width",), "height": ("height",)}

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
                            raise UsageError(f"{path}:{n}: not a JSON object ({e})") from None
                        if not isinstance(record, dict):
                            raise UsageError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
                        yield record


def iter_tar_records(root: str) -> Iterator[dict]:
    """img2dataset webdataset shards: one dict per key (sorted), its `.json` fields plus `_image` bytes."""
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


def count_inputs(source: str) -> int:
    """How many captioned images `read_inputs(source)` gives (JSON lines are parsed, so a malformed
    one is an error here, before any work; Parquet from its metadata; tars by their keys)."""
    if source.endswith(".tar"):
        return sum(1 for _ in iter_tar_keys(source))
    if source.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(source).metadata.num_rows
    return sum(1 for _ in iter_record_files(source))


def iter_tar_keys(path: str) -> Iterator[str]:
    with tarfile.open(path) as tar:
        yield from sorted({os.path.splitext(m.name)[0] for m in tar.getmembers() if m.isfile()})


def images_folder(source: str, images: str = "") -> str:
    """Where `source`'s images are: `images`, else `images/` beside the record files."""
    return images or os.path.join(source if os.path.isdir(source) else os.path.dirname(source), "images")


def read_inputs(source: str, images: str = "", start: int = 0, stop: int | None = None,
                columns: dict | None = None, read_images: bool = True) -> Iterator[dict]:
    """Captioned images `start` to `stop` of `source` as dicts: key, caption, url, width, height,
    image (bytes, b"" when missing or not `read_images`). `columns` maps fields to column names
    (default: `COLUMNS`)."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"input {source!r} does not exist")
    folder = images_folder(source, images)
    files = iter_record_files(source) if not source.endswith(".tar") else iter(())
    for row in itertools.islice(itertools.chain(files, iter_tar_records(source)), start, stop):
        if "_image" in row:  # from a tar
            yield input_fields(row, row.pop("_image"), columns)
            continue
        fields = input_fields(row, b"", columns)
        path = find_image(folder, fields["key"]) if fields["key"] and read_images else None
        if path:
            with open(path, "rb") as f:
                fields["image"] = f.read()
        yield fields


def input_fields(row: dict, data: bytes = b"", columns: dict | None = None) -> dict:
    """A record row's key, caption, url, width, height (found by `COLUMNS`, or `columns`) and image."""
    lower = {str(k).lower(): v for k, v in row.items()}

    def get(field):
        names = (columns or {}).get(field) or COLUMNS[field]
        for name in (names,) if isinstance(names, str) else names:
            if lower.get(name.lower()) is not None:
                return lower[name.lower()]
        return None

    caption, key = get("caption"), get("key")
    return {"key": "" if key is None else str(key), "caption": caption if isinstance(caption, str) else "",
            "url": str(get("url") or ""), "width": int(get("width") or 0), "height": int(get("height") or 0),
            "image": data or b""}


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


def parquet_bytes(records: list[dict]) -> bytes:
    """Records as one Parquet file's bytes (`RECORD_COLUMNS`, `arrow_schema`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{k: r[k] for k in RECORD_COLUMNS} for r in records], schema=arrow_schema())
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def read_records(out_dir: str) -> list[dict]:
    """All records of a build's Parquet shards, sorted by key."""
    import pyarrow.parquet as pq

    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*.parquet"))):
        rows.extend(pq.read_table(path).to_pylist())
    return sorted(rows, key=lambda r: r["key"])
