"""Params checkpoints: a folder with `model_config.json` (our `Kosmos2Config`) and `params/`, the
params tree as one standard Orbax PyTree checkpoint. Anyone restores it with plain Orbax:

    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract_params(model))
    params = ocp.StandardCheckpointer().restore("ckpt/kosmos2/params", abstract)

`save_checkpoint` writes each array as zarr3 without OCDBT or compression, one chunk file per
layer of a scanned stack and one per array (or per shard) otherwise. `restore_params` maps a chunk
file that is exactly a target shard copy-on-write (no read, no copy: XLA:CPU adopts the page-aligned
pages as they are) and reads the others chunk by chunk into aligned buffers, each process only the
shards its devices hold. It can also split scanned (stacked) layers into per-layer arrays on the
way in (`scan_layers=False` / `scan_text_layers=False`, what decoding wants). A mapped checkpoint
must not be truncated in place while in use (replacing it, as our commands do, is safe). Other Orbax layouts (OCDBT, compressed)
restore through Orbax.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from kosmos2_jax.models import Kosmos2, Kosmos2Config, sharding
from kosmos2_jax.utils.errors import UsageError

_ALIGN = 64  # XLA:CPU uses a host buffer in place when it is aligned to this
_READERS = 4  # chunk reads in flight; reads release the GIL


def abstract_params(model: Kosmos2) -> dict:
    """Shapes/dtypes of the params tree, without allocating it."""
    return nn.unbox(sharding.logical_params(model))  # a fresh tree for the caller


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def read_json(path: str, what: str):
    """A JSON file, or a one-line error naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} {path!r} is not valid JSON ({e})") from None


# --- writing -----------------------------------------------------------------------------------
class _NoMergeNote(logging.Filter):
    """Orbax finalizes every save with an OCDBT merge and warns when, as here, there is none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT" not in record.getMessage()


@contextlib.contextmanager
def _quiet_merge():
    note, absl = _NoMergeNote(), logging.getLogger("absl")
    absl.addFilter(note)
    try:
        yield
    finally:
        absl.removeFilter(note)


def save_checkpoint(out_dir: str, config: Kosmos2Config, params: Mapping, step: int | None = None,
                    extra_json: Mapping[str, Any] | None = None) -> int:
    """Write `model_config.json` + `params/` (see the module docstring), and `step.json` with the
    training step the params are from when `step` is given. `params` may be numpy or
    global jax arrays sharded over several processes: collective then, every process writes its own
    shards and none gathers the model. Its config has the default `attention_impl`, layer layout
    and no frozen layers: how a run computed is not a property of the weights. The folder is written beside
    `out_dir` and replaces it whole when complete (a kill leaves the old one as it was). Returns
    the parameter count."""
    import orbax.checkpoint as ocp

    from kosmos2_jax.utils import multihost
    from kosmos2_jax.utils import outputs

    tree = jax.tree_util.tree_map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), nn.unbox(params))
    # one chunk file per layer of a scanned stack, one per array (or per process's shard) else:
    # a layer or an array can then be mapped from its file as it is
    flat = traverse_util.flatten_dict(tree)
    save_args = traverse_util.unflatten_dict(
        {path: ocp.SaveArgs(shard_axes=(0,) if "layer" in path else ()) for path in flat})
    # uncompressed, one folder per array, one array (at least 1 GB) on its way to the disk at a time
    in_flight = max(1, math.ceil(max(x.nbytes for x in jax.tree_util.tree_leaves(tree)) / 1e9))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True, use_compression=False,
                                          save_concurrent_gb=in_flight, save_device_host_concurrent_gb=in_flight)
    primary = multihost.is_primary()
    with outputs.atomic_dir(out_dir, primary=primary) as tmp:
        multihost.sync("save_checkpoint:made")
        if primary:
            with open(os.path.join(tmp, "model_config.json"), "w") as f:
                plain = config.replace(attention_impl="einsum", scan_text_layers=None, frozen_vision_layers=0)
                json.dump(plain.to_dict(), f, indent=2)
            if step is not None:
                with open(os.path.join(tmp, STEP_FILE), "w") as f:
                    json.dump({"step": int(step)}, f)
            for name, value in (extra_json or {}).items():  # e.g. export --adapters_only's lora.json
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(value, f, indent=2)
        with _quiet_merge(), ocp.Checkpointer(handler) as ckptr:
            ckptr.save(os.path.join(tmp, "params"), args=ocp.args.PyTreeSave(tree, save_args=save_args), force=True)
        multihost.sync("save_checkpoint:written")
        if primary:
            write_chunk_list(tmp)
    multihost.sync("save_checkpoint:committed")
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


CHUNK_LIST = "chunks.json"
STEP_FILE = "step.json"


def exported_step(path: str) -> int | None:
    """The training step a checkpoint's params are from (`step.json`), None when not recorded."""
    try:
        with open(os.path.join(path, STEP_FILE)) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_chunk_list(ckpt_dir: str) -> None:
    """`CHUNK_LIST`: every chunk file under params/ with its size. zarr leaves out a chunk that is
    all fill value, so without this list a lost chunk file would read back as zeros."""
    where = os.path.join(ckpt_dir, "params")
    listing = {}
    for name in sorted(os.listdir(where)):
        folder = os.path.join(where, name)
        if os.path.isfile(os.path.join(folder, "zarr.json")):
            listing[name] = {os.path.relpath(os.path.join(root, f), folder): os.path.getsize(os.path.join(root, f))
                             for root, _, files in os.walk(folder) for f in files if f != "zarr.json"}
    with open(os.path.join(ckpt_dir, CHUNK_LIST), "w") as f:
        json.dump(listing, f)


# --- reading zarr3 chunk files directly --------------------------------------------------------
_ZARR_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int32": np.int32,
                "int64": np.int64, "uint8": np.uint8, "bool": np.bool_}
_NO_CHUNK = 2**64 - 1


def _little_bytes(codec) -> bool:
    return codec.get("name") == "bytes" and codec.get("configuration", {}).get("endian", "little") == "little"


class ZarrArray:
    """One zarr3 array folder as `save_checkpoint` writes it: raw little-endian chunks, each in its
    own file, bare or inside a one-chunk `sharding_indexed` shard. `open` returns None for any
    other layout (the caller then asks Orbax)."""

    def __init__(self, folder, shape, dtype, chunk, fill, index_at: str | None, separator: str, prefix: str):
        self.folder, self.shape, self.dtype, self.chunk = folder, shape, dtype, chunk
        self.fill, self.index_at, self.separator, self.prefix = fill, index_at, separator, prefix
        self.chunk_bytes = math.prod(chunk) * np.dtype(dtype).itemsize
        self.written: dict | None = None  # chunk file -> size, when the checkpoint lists them

    @classmethod
    def open(cls, folder: str) -> "ZarrArray | None":
        try:
            with open(os.path.join(folder, "zarr.json")) as f:
                meta = json.load(f)
            shape = tuple(meta["shape"])
            dtype = _ZARR_DTYPES[meta["data_type"]]
            chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            codecs = meta["codecs"]
            keys = meta.get("chunk_key_encoding", {"name": "default"})
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or len(chunk) != len(shape):
            return None
        index_at = None
        if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
            conf = codecs[0].get("configuration", {})
            inner, index = conf.get("codecs", []), conf.get("index_codecs", [])
            if (tuple(conf.get("chunk_shape", ())) != chunk or len(inner) != 1 or not _little_bytes(inner[0])
                    or len(index) != 2 or not _little_bytes(index[0]) or index[1].get("name") != "crc32c"):
                return None
            index_at = conf.get("index_location", "end")
        elif not (len(codecs) == 1 and _little_bytes(codecs[0])):
            return None
        separator = keys.get("configuration", {}).get("separator", "/" if keys.get("name") == "default" else ".")
        prefix = {"default": "c", "v2": None}.get(keys.get("name"), "?")
        if prefix == "?" or index_at not in (None, "start", "end"):
            return None
        fill = meta.get("fill_value", 0)
        fill = float(fill) if isinstance(fill, str) else fill  # "NaN", "Infinity"
        return cls(folder, shape, dtype, chunk, fill, index_at, separator, prefix)

    def _chunk_file(self, coords) -> str:
        if self.prefix:  # zarr3 "default" keys: c/0/1 (or c.0.1)
            key = self.prefix + "".join(self.separator + str(c) for c in coords)
        else:  # "v2" keys: 0.1, or 0 for a scalar
            key = self.separator.join(str(c) for c in coords) or "0"
        return os.path.join(self.folder, *key.split("/"))

    def chunks_in(self, region) -> Iterator[tuple]:
        """Grid coordinates of the chunks that overlap `region` ((start, stop) per axis)."""
        ranges = [range(lo // k, -(-hi // k)) for (lo, hi), k in zip(region, self.chunk)]
        for idx in np.ndindex(*[len(r) for r in ranges]):
            yield tuple(r[i] for r, i in zip(ranges, idx))

    def _data_offset(self, f, path: str, listed) -> int | None:
        """Where chunk `path`'s bytes start in the open file `f` (None: an empty chunk)."""
        size = os.fstat(f.fileno()).st_size
        if listed is not None and size != listed:
            raise UsageError(f"{path}: chunk file is truncated ({size} of {listed} bytes)")
        offset = 0
        if self.index_at is not None:
            f.seek(0 if self.index_at == "start" else size - 20)
            offset, nbytes = np.frombuffer(f.read(16), "<u8").tolist()
            if offset == _NO_CHUNK:
                return None
            if nbytes != self.chunk_bytes:
                raise UsageError(f"{path}: damaged chunk ({nbytes} bytes at {offset}, file of {size})")
        if offset + self.chunk_bytes > size:
            raise UsageError(f"{path}: chunk is truncated")
        return offset

    def _listed(self, path: str):
        return None if self.written is None else self.written.get(os.path.relpath(path, self.folder))

    def whole_chunk(self, region) -> tuple | None:
        """The coordinates of the one chunk that is exactly `region`, if there is one."""
        if all(lo % k == 0 and hi - lo == k for (lo, hi), k in zip(region, self.chunk)):
            return tuple(lo // k for (lo, _), k in zip(region, self.chunk))
        return None

    def map_chunk(self, coords) -> np.ndarray | None:
        """Chunk `coords` mapped copy-on-write from its file: nothing is read or copied now, its
        pages come from the page cache when first touched. None when it cannot be mapped (no file,
        an empty chunk, data off a page boundary); `read_chunk_into` handles those."""
        path = self._chunk_file(coords)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return None
        with f:
            offset = self._data_offset(f, path, self._listed(path))
            if offset is None or offset % mmap.ALLOCATIONGRANULARITY:
                return None
            mapped = mmap.mmap(f.fileno(), offset + self.chunk_bytes, access=mmap.ACCESS_COPY)
        return np.frombuffer(mapped, self.dtype, count=math.prod(self.chunk), offset=offset).reshape(self.chunk)

    def read_chunk_into(self, coords, region, out: np.ndarray) -> None:
        """Copy the part of chunk `coords` inside `region` into `out` (which holds `region`)."""
        start = [c * k for c, k in zip(coords, self.chunk)]
        lo = [max(s, r0) for s, (r0, _) in zip(start, region)]
        hi = [min(s + k, r1) for s, k, (_, r1) in zip(start, self.chunk, region)]
        dest = out[tuple(slice(a - r0, b - r0) for a, b, (r0, _) in zip(lo, hi, region))]
        path = self._chunk_file(coords)
        listed = self._listed(path)
        try:
            f = open(path, "rb")
        except FileNotFoundError:  # zarr leaves out chunks that are all fill value
            if listed is not None:
                raise UsageError(f"{path}: chunk file is missing (damaged checkpoint)") from None
            dest[...] = self.fill
            return
        with f:
            offset = self._data_offset(f, path, listed)
            if offset is None:
                dest[...] = self.fill
                return
            f.seek(offset)
            whole = lo == start and all(b - a == k for a, b, k in zip(lo, hi, self.chunk))
            target = dest if whole and dest.flags.c_contiguous and dest.dtype == self.dtype else \
                np.empty(self.chunk, self.dtype)
            if f.readinto(memoryview(target.reshape(-1)).cast("B")) != self.chunk_bytes:
                raise UsageError(f"{path}: chunk is truncated")
        if target is not dest:
            dest[...] = target[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))]


# --- restoring ---------------------------------------------------------------------------------
def read_model_config(ckpt_dir: str) -> Kosmos2Config:
    cfg_path = os.path.join(ckpt_dir, "model_config.json")
    if not os.path.isfile(cfg_path) or not os.path.isdir(os.path.join(ckpt_dir, "params")):
        raise UsageError(f"{ckpt_dir!r} is not a kosmos2_jax checkpoint (needs model_config.json and params/)")
    try:
        return Kosmos2Config.from_dict(read_json(cfg_path, "the model config"))
    except (TypeError, KeyError) as e:
        raise UsageError(f"the model config {cfg_path!r} does not describe a Kosmos2Config ({e})") from None


def is_tree_checkpoint(ckpt_dir: str) -> bool:
    """`params/` holds an Orbax PyTree checkpoint (its metadata file)."""
    return os.path.isfile(os.path.join(ckpt_dir, "params", "_METADATA"))


def _direct_arrays(ckpt_dir: str) -> dict | None:
    """A ZarrArray per saved param when the folder has the layout `save_checkpoint` writes, else None."""
    where = os.path.join(ckpt_dir, "params")
    if not is_tree_checkpoint(ckpt_dir) or os.path.exists(os.path.join(where, "manifest.ocdbt")):
        return None
    listing = None
    if os.path.isfile(os.path.join(ckpt_dir, CHUNK_LIST)):
        listing = read_json(os.path.join(ckpt_dir, CHUNK_LIST), "the chunk list")
    arrays = {}
    for name in sorted(os.listdir(where)):
        if os.path.isfile(os.path.join(where, name, "zarr.json")):
            array = ZarrArray.open(os.path.join(where, name))
            if array is None:
                return None
            array.written = None if listing is None else listing.get(name, {})
            arrays[tuple(name.split("."))] = array
    return arrays


def _layout(shapes: dict, saved: Kosmos2Config, wanted: Kosmos2Config) -> dict:
    """wanted path -> (saved path, layer or None, shape), from the saved arrays' shapes alone (so
    reading can start before the model is traced): a tower's stack split per layer when `wanted`
    unrolls it, everything else as saved."""
    split = {"text_model": saved.text_layers_scanned and not wanted.text_layers_scanned,
             "vision_model": saved.scan_layers and not wanted.scan_layers}
    out = {}
    for path, shape in shapes.items():
        if split.get(path[0]) and "layer" in path:
            at = path.index("layer")
            for i in range(shape[0]):
                out[path[:at] + (f"layer_{i}",) + path[at + 1:]] = (path, i, tuple(shape[1:]))
        else:
            out[path] = (path, None, tuple(shape))
    return out


def _check_layout(ckpt_dir: str, found: dict, expected: dict) -> None:
    for path, spec in expected.items():
        if path not in found:
            raise UsageError(f"{ckpt_dir!r}: parameter {'/'.join(path)} is missing (truncated checkpoint?)")
        if tuple(found[path][2]) != tuple(spec.shape):
            raise UsageError(f"{ckpt_dir!r}: parameter {'/'.join(path)} has shape {tuple(found[path][2])}, "
                             f"model_config.json says {tuple(spec.shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise UsageError(f"{ckpt_dir!r}: parameter {'/'.join(extra[0])} is not in the model of model_config.json")


def _index_region(index, shape) -> tuple[tuple[int, int], ...]:
    return tuple((s.start or 0, shape[d] if s.stop is None else s.stop) for d, s in enumerate(index))


def _read_direct(arrays: dict, layout: dict, shardings: dict | None) -> dict:
    """Every leaf of `layout`: each distinct addressable shard mapped from its chunk file when it is
    one whole chunk, else read chunk by chunk into its own aligned buffer; then handed to its
    devices (no copy on CPU), or numpy when `shardings` is None."""
    jobs, buffers = [], {}
    for path, (src, layer, shape) in layout.items():
        array = arrays[src]
        indices = ([tuple(slice(None) for _ in shape)] if shardings is None
                   else shardings[path].addressable_devices_indices_map(tuple(shape)).values())
        for index in indices:
            region = _index_region(index, shape)
            if region in buffers.setdefault(path, {}):
                continue
            src_region = ((layer, layer + 1),) + region if layer is not None else region
            shard_shape = tuple(b - a for a, b in region)
            coords = array.whole_chunk(src_region)
            mapped = array.map_chunk(coords) if coords is not None else None
            if mapped is not None:  # one chunk file is this shard: use the file's pages themselves
                buffers[path][region] = mapped.reshape(shard_shape)
                continue
            buf = buffers[path][region] = aligned_empty(shard_shape, array.dtype)
            into = buf.reshape((1,) + buf.shape) if layer is not None else buf
            jobs += [(array, c, src_region, into) for c in array.chunks_in(src_region)]
    with ThreadPoolExecutor(_READERS) as pool:
        for f in [pool.submit(a.read_chunk_into, c, r, o) for a, c, r, o in jobs]:
            f.result()
    if shardings is None:
        return {path: next(iter(b.values())) for path, b in buffers.items()}
    return {path: _assemble(buffers[path], shardings[path], tuple(layout[path][2])) for path in layout}


def _assemble(buffers: dict, sharding, shape) -> jax.Array:
    arrays, used = [], set()
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        region = _index_region(index, shape)
        # the first device takes the buffer itself; a replica needs its own copy (it may be donated)
        arrays.append(jax.device_put(buffers[region], device, may_alias=region not in used))
        used.add(region)
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _saved_shapes(ckpt_dir: str, config: Kosmos2Config) -> dict:
    """path -> shape of what the folder holds, from Orbax's metadata."""
    import orbax.checkpoint as ocp

    if not is_tree_checkpoint(ckpt_dir):
        raise UsageError(f"{ckpt_dir!r}: params/ holds no Orbax PyTree checkpoint (no params/_METADATA)")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            tree = ckptr.metadata(os.path.join(ckpt_dir, "params")).item_metadata.tree
        except Exception as e:  # Orbax raises many types for damaged files
            raise UsageError(f"cannot read the params metadata of {ckpt_dir!r}: {e}") from e
    return {p: tuple(m.shape) for p, m in traverse_util.flatten_dict(tree).items()}


def _read_through_orbax(ckpt_dir: str, saved: dict, found: dict) -> dict:
    """numpy leaves of `found` (see `_layout`) from the arrays `saved` (path -> shape) of any
    Orbax PyTree layout (OCDBT, compressed, ...), through Orbax."""
    import orbax.checkpoint as ocp

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        target = traverse_util.unflatten_dict(
            {p: jax.ShapeDtypeStruct(s, np.float32, sharding=device) for p, s in saved.items()})
        try:
            stored = traverse_util.flatten_dict(ckptr.restore(os.path.join(ckpt_dir, "params"), target))
        except Exception as e:  # Orbax raises many types for damaged files
            raise UsageError(f"cannot restore the params of {ckpt_dir!r}: {e}") from e
    return {path: np.asarray(stored[src])[layer] if layer is not None else np.asarray(stored[src])
            for path, (src, layer, _) in found.items()}


def _read(ckpt_dir: str, saved: Kosmos2Config, wanted: Kosmos2Config, expected, shardings: dict | None,
          numpy: bool) -> dict:
    """The params of `wanted` (its layout), checked against `expected` (a future of the traced
    shapes): read in place from `save_checkpoint`'s layout, else through Orbax."""
    arrays = _direct_arrays(ckpt_dir)
    shapes = {p: a.shape for p, a in arrays.items()} if arrays is not None else _saved_shapes(ckpt_dir, saved)
    found = _layout(shapes, saved, wanted)
    if not numpy and shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = {p: device for p in found}
    if arrays is None or (shardings is not None and set(found) != set(shardings)):
        _check_layout(ckpt_dir, found, expected.result())  # before reading; names what differs
    if shardings is not None and set(found) != set(shardings):
        raise UsageError(f"{ckpt_dir!r}: the target shardings do not match the model's params")
    if arrays is not None:
        flat = _read_direct(arrays, found, shardings)
        _check_layout(ckpt_dir, found, expected.result())
    else:
        flat = _read_through_orbax(ckpt_dir, shapes, found)
        if not numpy:
            flat = {p: jax.device_put(v, shardings[p]) for p, v in flat.items()}
    dtypes = {p: spec.dtype for p, spec in expected.result().items()}
    return {p: v if v.dtype == dtypes[p] else v.astype(dtypes[p]) for p, v in flat.items()}


def stored_abstract_params(ckpt_dir: str, **layout: Any) -> dict | None:
    """ShapeDtypeStructs of the params `restore_params(ckpt_dir, **layout)` returns, from the saved
    arrays' metadata alone (milliseconds; tracing the released model takes a second or more), or
    None when the folder is not in `save_checkpoint`'s layout. Nothing here checks them against
    model_config.json: tracing the model on them does (a shape or name it does not expect fails)."""
    ckpt_dir = os.path.abspath(ckpt_dir)
    arrays = _direct_arrays(ckpt_dir)
    if arrays is None:
        return None
    saved = read_model_config(ckpt_dir)
    found = _layout({p: a.shape for p, a in arrays.items()}, saved, saved.replace(**layout))
    return traverse_util.unflatten_dict({p: jax.ShapeDtypeStruct(shape, arrays[src].dtype)
                                         for p, (src, _, shape) in found.items()})


def check_fits(ckpt_dir: str, abstract: Any, model: Kosmos2) -> None:
    """A ValueError naming the first param of `abstract` (from `stored_abstract_params`) that
    `model` has not, lacks, or has in another shape; nothing when they fit."""
    found = {p: (p, None, tuple(s.shape)) for p, s in traverse_util.flatten_dict(abstract).items()}
    _check_layout(ckpt_dir, found, traverse_util.flatten_dict(abstract_params(model)))


def restore_params(ckpt_dir: str, *, shardings: Any = None, numpy: bool = False, abstract: Any = None,
                   **layout: Any) -> tuple[Kosmos2, dict]:
    """A params checkpoint folder -> (Kosmos2 model, params). `layout` overrides compute settings
    of the saved config (e.g. `scan_layers=False`: stacked layers come back as one array per
    layer). `shardings`: a tree of target shardings like the params (default: the first local
    device); `numpy=True` returns host numpy arrays instead. `abstract`: the params' shapes and
    dtypes when the caller has them (`stored_abstract_params`), checked against instead of the
    traced model."""
    ckpt_dir = os.path.abspath(ckpt_dir)
    saved = read_model_config(ckpt_dir)
    model = Kosmos2(saved.replace(**layout))
    flat_shardings = None if numpy or shardings is None else traverse_util.flatten_dict(nn.unbox(shardings))
    with ThreadPoolExecutor(1) as side:  # trace the model's shapes while the chunks are read
        expected = side.submit(lambda: traverse_util.flatten_dict(abstract if abstract is not None
                                                                  else abstract_params(model)))
        flat = _read(ckpt_dir, saved, model.config, expected, flat_shardings, numpy)
    return model, traverse_util.unflatten_dict(flat)


def iter_checkpoint_leaves(ckpt_dir: str) -> tuple[Kosmos2, Iterator[tuple[tuple[str, ...], np.ndarray]]]:
    """(model, generator of (path, numpy array)) in the saved layout, one parameter read at a time
    when the folder has `save_checkpoint`'s layout (so a conversion holds one parameter)."""
    ckpt_dir = os.path.abspath(ckpt_dir)
    config = read_model_config(ckpt_dir)
    model = Kosmos2(config)
    expected = traverse_util.flatten_dict(abstract_params(model))
    arrays = _direct_arrays(ckpt_dir)
    shapes = {p: a.shape for p, a in arrays.items()} if arrays is not None else _saved_shapes(ckpt_dir, config)
    found = _layout(shapes, config, config)
    _check_layout(ckpt_dir, found, expected)

    def leaves():
        if arrays is None:
            host = _read_through_orbax(ckpt_dir, shapes, found)
            for path in expected:
                yield path, host.pop(path)
            return
        for path in expected:
            yield path, _read_direct(arrays, {path: found[path]}, None)[path]
    return model, leaves()


def load_checkpoint(ckpt_dir: str, abstract: Any = None, **layout: Any) -> tuple[Kosmos2, dict]:
    """A params checkpoint folder -> (Kosmos2 model, params on the first local device)."""
    return restore_params(ckpt_dir, abstract=abstract, **layout)
