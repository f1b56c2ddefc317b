"""Hugging Face KOSMOS-2 checkpoints <-> Flax params, streamed tensor by tensor (the command:
`python -m kosmos2_jax.convert`).

A converted checkpoint folder is a params checkpoint (`kosmos2_jax.weights.checkpoint`): `model_config.json`
(our `Kosmos2Config`) and `params/`, the params tree as one standard Orbax PyTree checkpoint, the
format training's export writes too. In Python:

    model, params = load_hf("kosmos-2-patch14-224/")      # HF folder -> (Kosmos2, params)
    model, params = load_checkpoint("ckpt/kosmos2")       # converted folder -> (Kosmos2, params)
    model, params = load_model(path, **DECODING)          # either, one array per layer (generation)

Mapping: PyTorch Linear weights [out, in] become Flax kernels [in, out]; the patch conv goes from
OIHW to HWIO; LayerNorm weight -> scale; per-layer tensors are stacked on a leading axis when the
model scans its layers. The LM head is tied to the token embeddings (checked on the way in).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import flax.linen as nn
from flax import traverse_util

from kosmos2_jax.weights.checkpoint import (abstract_params, aligned_empty, iter_checkpoint_leaves, load_checkpoint,
                                    read_json, save_checkpoint)
from kosmos2_jax.models import Kosmos2, Kosmos2Config, TextConfig, VisionConfig
from kosmos2_jax.utils.errors import UsageError

# Keys HF checkpoints may carry that hold no parameters of ours.
_IGNORED = re.compile(r".*(position_ids|embed_positions\.weights|self_attn_sope\.scale)$")
_LM_HEAD = "text_model.lm_head.weight"


# --- configs -----------------------------------------------------------------------------------
def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> Kosmos2Config:
    """HF `Kosmos2Config.to_dict()` (config.json) -> our config; missing fields take HF defaults."""
    t, v = dict(hf.get("text_config") or {}), dict(hf.get("vision_config") or {})
    text_fields = {f.name for f in TextConfig.__dataclass_fields__.values()}
    vision_fields = {f.name for f in VisionConfig.__dataclass_fields__.values()}
    if t.get("add_cross_attention"):
        raise UsageError("text_config.add_cross_attention=True is not supported (the released model has none)")
    text = TextConfig(**{k: t[k] for k in text_fields if k in t})
    vision = VisionConfig(**{k: v[k] for k in vision_fields if k in v})
    return Kosmos2Config(vision=vision, text=text, latent_query_num=hf.get("latent_query_num", 64), **overrides)


def config_to_hf(config: Kosmos2Config) -> dict:
    """Our config -> a `config.json` dict that `Kosmos2Config.from_dict` / `from_pretrained` read."""
    text = {k: getattr(config.text, k) for k in TextConfig.__dataclass_fields__}
    text.update(model_type="kosmos_2_text_model", use_cache=True)
    vision = {k: getattr(config.vision, k) for k in VisionConfig.__dataclass_fields__}
    vision.update(model_type="kosmos_2_vision_model")
    return {"architectures": ["Kosmos2ForConditionalGeneration"], "model_type": "kosmos-2",
            "latent_query_num": config.latent_query_num, "text_config": text, "vision_config": vision,
            "tie_word_embeddings": True, "torch_dtype": "float32"}


# --- key mapping -------------------------------------------------------------------------------
def _leaf_to_hf(leaf: str) -> str:
    return {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)


def hf_key(path: tuple[str, ...], layer: int | None = None) -> str:
    """Flax param path (without the stacked layer axis) -> HF state-dict key."""
    top, *rest = path
    if top == "text_model":
        if rest[0] == "layers":
            inner = rest[2:]
            return f"text_model.model.layers.{layer}." + ".".join([*inner[:-1], _leaf_to_hf(inner[-1])])
        return "text_model.model." + ".".join([*rest[:-1], _leaf_to_hf(rest[-1])])
    if top == "vision_model":
        if rest[0] == "encoder":
            inner = rest[2:]
            if inner[0] in ("fc1", "fc2"):
                inner = ["mlp", *inner]
            return f"vision_model.model.encoder.layers.{layer}." + ".".join([*inner[:-1], _leaf_to_hf(inner[-1])])
        if rest[0] in ("class_embedding", "position_embedding", "patch_embedding"):
            name = {"class_embedding": "class_embedding", "position_embedding": "position_embedding.weight",
                    "patch_embedding": "patch_embedding.weight"}[rest[0]]
            return "vision_model.model.embeddings." + name
        return "vision_model.model." + ".".join([*rest[:-1], _leaf_to_hf(rest[-1])])
    if top == "image_to_text_projection":
        return "image_to_text_projection." + ".".join([*rest[:-1], _leaf_to_hf(rest[-1])])
    raise UsageError(f"no HF key for param path {'/'.join(path)}")


def _layer_of(path: tuple[str, ...]) -> tuple[tuple[str, ...], int | None, bool]:
    """Split a path into (path with `layer` for the block, unscanned layer index, is_stacked)."""
    for i, part in enumerate(path):
        m = re.fullmatch(r"layer_(\d+)", part)
        if m:
            return path[:i] + ("layer",) + path[i + 1:], int(m.group(1)), False
        if part == "layer":
            return path, None, True
    return path, None, False


def hf_keys(path: tuple[str, ...], shape: tuple[int, ...]) -> list[str]:
    """The HF keys a Flax parameter covers: one per layer when stacked by `nn.scan`, else one."""
    block_path, loop_layer, stacked = _layer_of(path)
    return [hf_key(block_path, layer) for layer in (range(shape[0]) if stacked else [loop_layer])]


def _to_hf_array(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:  # conv HWIO -> OIHW
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if path[-1] == "kernel":
        return np.ascontiguousarray(value.T)
    return value


def _from_hf_array(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:  # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel":
        return value.T
    return value


# --- reading HF checkpoints --------------------------------------------------------------------
class TensorSource:
    """Lazy read access to a state dict: a mapping of tensors, or a folder/file of safetensors or
    pytorch_model*.bin (sharded or not). `get` returns float32 numpy."""

    def __init__(self, source: Any):
        self._mapping, self._files = None, {}
        if isinstance(source, Mapping):
            self._mapping = source
            self.name = "<state dict>"
            return
        path = os.fspath(source)
        self.name = path
        files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
        if os.path.isdir(path) and not files:
            files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
        if not files or not all(os.path.isfile(f) for f in files):
            raise UsageError(f"no weights in {path!r}: expected *.safetensors or pytorch_model*.bin")
        for f in files:
            for key, opener in self._index(f):
                self._files[key] = opener

    @staticmethod
    def _index(path: str) -> Iterator[tuple[str, Any]]:
        if path.endswith(".safetensors"):
            reader = SafetensorsReader(path)
            for key in reader.keys():
                yield key, (lambda k=key: reader.get(k))
        else:
            import torch

            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise UsageError(f"cannot read PyTorch checkpoint {path!r}: {e}") from e
            for key, tensor in state.items():
                yield key, (lambda t=tensor: t)

    def keys(self) -> list[str]:
        return list(self._mapping.keys() if self._mapping is not None else self._files.keys())

    def get(self, key: str) -> np.ndarray:
        value = self._mapping[key] if self._mapping is not None else self._files[key]()
        if hasattr(value, "detach"):  # torch tensor (bf16/fp16 included)
            value = value.detach().float().cpu().numpy()
        return np.asarray(value, dtype=np.float32)


class SafetensorsReader:
    """Reads one tensor at a time with plain file reads (no mmap, so converted tensors do not stay
    resident as file pages). F32, F16 and BF16 tensors come back as float32."""

    _DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > os.path.getsize(path) - 8:
                    raise UsageError(f"header of {size} bytes is longer than the file")
                self._header = json.loads(f.read(size))
            self._base = 8 + size
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read safetensors file {path!r}: {e}") from e
        self._header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in self._header.values()), default=0)
        if self._base + end > os.path.getsize(path):
            raise UsageError(f"safetensors file {path!r} is truncated: data ends at {self._base + end} bytes, "
                             f"file has {os.path.getsize(path)}")

    def keys(self) -> list[str]:
        return list(self._header)

    def get(self, key: str) -> np.ndarray:
        info = self._header[key]
        if info["dtype"] not in self._DTYPES:
            raise UsageError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out = np.empty(info["shape"], self._DTYPES[info["dtype"]])
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            if f.readinto(memoryview(out.reshape(-1)).cast("B")) != end - start:
                raise UsageError(f"{self.path}: tensor {key!r} is truncated")
        if info["dtype"] == "BF16":
            return (out.astype(np.uint32) << 16).view(np.float32)
        return out.astype(np.float32, copy=False)


def iter_params_from_hf(state: Any, config: Kosmos2Config) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(flax path, array) for every parameter of `Kosmos2(config)`, built one at a time from an HF
    state dict (mapping, file or folder). Checks every tensor's presence and shape, the tied head
    and unexpected keys; errors name the key and the shapes."""
    source = state if isinstance(state, TensorSource) else TensorSource(state)
    available = set(source.keys())
    expected = traverse_util.flatten_dict(abstract_params(Kosmos2(config)))
    known = {key for path, spec in expected.items() for key in hf_keys(path, spec.shape)}
    unexpected = sorted(k for k in available - known if k != _LM_HEAD and not _IGNORED.match(k))
    if unexpected:
        raise UsageError(f"{source.name}: unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for path, spec in expected.items():
        stacked = _layer_of(path)[2]
        out = aligned_empty(spec.shape, np.float32)  # aligned: XLA:CPU then uses it in place
        for i, key in enumerate(hf_keys(path, spec.shape)):
            if key not in available:
                raise UsageError(f"{source.name}: missing tensor {key!r} (needed for {'/'.join(path)})")
            value = _from_hf_array(path, source.get(key))
            want = spec.shape[1:] if stacked else spec.shape
            if value.shape != tuple(want):
                raise UsageError(f"{source.name}: tensor {key!r} has shape {tuple(_to_hf_shape(path, value.shape))} "
                                 f"but the model config needs {tuple(_to_hf_shape(path, want))}")
            if stacked:
                out[i] = value
            else:
                out = value
        if path == ("text_model", "embed_tokens", "embedding") and _LM_HEAD in available:
            head = source.get(_LM_HEAD)
            if head.shape != out.shape or not np.array_equal(head, out):
                raise UsageError(f"{source.name}: {_LM_HEAD} differs from the token embeddings; only tied heads "
                                 "are supported")
            del head
        yield path, out.astype(spec.dtype, copy=False)


def params_from_hf(state: Any, config: Kosmos2Config) -> dict:
    """An HF state dict (mapping, file or folder) -> Flax params for `Kosmos2(config)` (numpy)."""
    return traverse_util.unflatten_dict(dict(iter_params_from_hf(state, config)))


def _to_hf_shape(path, shape):
    shape = tuple(shape)
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:
        return shape[::-1]
    return shape


def params_to_hf(params: Mapping) -> Iterator[tuple[str, np.ndarray]]:
    """Flax params -> (HF key, numpy tensor) pairs, one tensor at a time, in a stable order."""
    return leaves_to_hf(sorted(traverse_util.flatten_dict(nn.unbox(params)).items()))


def leaves_to_hf(leaves) -> Iterator[tuple[str, np.ndarray]]:
    for path, value in leaves:
        value = np.asarray(value)
        keys = hf_keys(path, value.shape)
        if _layer_of(path)[2]:
            for i, key in enumerate(keys):
                yield key, _to_hf_array(path, value[i])
        else:
            yield keys[0], _to_hf_array(path, value)


def state_dict_from_params(params: Mapping) -> dict[str, np.ndarray]:
    return dict(params_to_hf(params))


# --- folders -----------------------------------------------------------------------------------
def to_device(params: Mapping) -> dict:
    """numpy leaves -> jax arrays one at a time, dropping each numpy copy as it goes (so jitted
    calls do not copy the params from host memory on every call)."""
    flat = traverse_util.flatten_dict(nn.unbox(params))
    for key in list(flat):
        flat[key] = jax.device_put(flat[key])
    return traverse_util.unflatten_dict(flat)


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"no config.json in {hf_dir!r}: expected a Hugging Face model folder")
    return read_json(path, "the Hugging Face config")


def load_hf(hf_dir: str, **config_overrides: Any) -> tuple[Kosmos2, dict]:
    """HF model folder -> (Kosmos2 model, params on the default device)."""
    config = config_from_hf(read_hf_config(hf_dir), **config_overrides)
    return Kosmos2(config), traverse_util.unflatten_dict(
        {path: jax.device_put(v) for path, v in iter_params_from_hf(TensorSource(hf_dir), config)})


# How generation wants the weights: one array per layer. On XLA:CPU a scanned layer copies its
# weights out of the stack at every call (decoding 2.4x slower); per-layer arrays are read in
# place, and each is one chunk file of the checkpoint, mapped rather than read.
DECODING = dict(scan_layers=False)


def is_hf_folder(path: str) -> bool:
    """An HF model folder (its config.json), not a kosmos2_jax checkpoint."""
    return os.path.isfile(os.path.join(path, "config.json"))


def refuse_training_workdir(path: str) -> None:
    """A train --workdir (its run config.json, model_config.json and checkpoints/) is not a model
    folder: name the export beside it instead of misreading it as a Hugging Face folder."""
    if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(os.path.join(path, "model_config.json")):
        export = os.path.join(path, "export")
        raise UsageError(f"{path!r} is a training workdir, not a model folder: use its export/ ({export!r}"
                         + (")" if os.path.isdir(export) else ", written when the run finishes; "
                            "`python -m kosmos2_jax.export --workdir` writes one from its latest checkpoint)"))


def model_config_of(path: str, **layout: Any) -> Kosmos2Config:
    """The config of the model `load_model(path, **layout)` returns, without reading weights."""
    from kosmos2_jax.weights.checkpoint import read_model_config

    refuse_training_workdir(path)
    if is_hf_folder(path):
        return config_from_hf(read_hf_config(path), **layout)
    return read_model_config(os.path.abspath(path)).replace(**layout)


def load_model(path: str, abstract: Any = None, **layout: Any) -> tuple[Kosmos2, dict]:
    """An HF model folder (config.json) or a params checkpoint -> (Kosmos2 model, params on the
    first local device). `layout`: compute settings such as `scan_text_layers=False`; `abstract`:
    the params' shapes (`abstract_params_of`), so that a checkpoint's are not traced again."""
    refuse_training_workdir(path)
    if is_hf_folder(path):
        return load_hf(path, **layout)
    return load_checkpoint(path, abstract=abstract, **layout)


def abstract_params_of(path: str, model: Kosmos2) -> dict:
    """Shapes and dtypes of the params `load_model(path, ...)` returns for `model`: from a
    checkpoint's metadata when it has them (no tracing), else traced."""
    from kosmos2_jax.weights.checkpoint import stored_abstract_params

    c = model.config
    stored = None if is_hf_folder(path) else stored_abstract_params(path, scan_layers=c.scan_layers,
                                                                    scan_text_layers=c.scan_text_layers)
    return stored if stored is not None else abstract_params(model)


# Dropout rates are training settings: a run sets its own, whatever the weights were trained with.
_TRAINING_FIELDS = {"vision": ("attention_dropout",), "text": ("dropout", "attention_dropout", "activation_dropout")}


def architecture_differences(weights: Kosmos2Config, wanted: Kosmos2Config) -> list[str]:
    """'tower.field: weights' value vs wanted value' for every architecture field that differs
    (compute settings such as dtype, remat, scan_layers and attention_impl are not architecture)."""
    diffs = [f"latent_query_num: {weights.latent_query_num} vs {wanted.latent_query_num}"
             ] if weights.latent_query_num != wanted.latent_query_num else []
    for tower in ("vision", "text"):
        a, b = getattr(weights, tower), getattr(wanted, tower)
        diffs += [f"{tower}.{name}: {getattr(a, name)} vs {getattr(b, name)}" for name in type(a).__dataclass_fields__
                  if name not in _TRAINING_FIELDS[tower] and getattr(a, name) != getattr(b, name)]
    return diffs


def load_params_for(config: Kosmos2Config, source: str) -> dict:
    """Params (numpy) for `Kosmos2(config)` from `source`, an HF model folder or a kosmos2_jax
    checkpoint of the same architecture. The weights are laid out for `config` (layers scanned or
    not); dtype, remat, attention_impl and dropout stay `config`'s."""
    ours = os.path.isfile(os.path.join(source, "model_config.json"))
    if ours:  # the leaves are read lazily, after the architecture check
        saved, leaves = iter_checkpoint_leaves(source)
        weights = saved.config
    else:
        weights = config_from_hf(read_hf_config(source))
    diffs = architecture_differences(weights, config)
    if diffs:
        raise UsageError(f"{source}: the weights' architecture differs from the config's model "
                         f"(weights vs config): {'; '.join(diffs)}")
    return params_from_hf(dict(leaves_to_hf(leaves)) if ours else TensorSource(source), config)


def write_safetensors(path: str, tensors: Iterator[tuple[str, np.ndarray]], shapes: dict[str, tuple]) -> None:
    """Stream tensors into a safetensors file: the header is written from `shapes` first, then each
    tensor's bytes as it arrives (float32), so only one tensor is in memory at a time."""
    header, offset = {}, 0
    for key in shapes:
        nbytes = 4 * math.prod(shapes[key])
        header[key] = {"dtype": "F32", "shape": list(shapes[key]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    order = [k for k in shapes]
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        pending = {}
        for key, value in tensors:
            pending[key] = value
            while order and order[0] in pending:
                f.write(np.ascontiguousarray(pending.pop(order.pop(0)), dtype=np.float32).tobytes())
    if order:
        raise UsageError(f"tensors missing when writing {path!r}: {order[:5]}")


def export_hf(out_dir: str, config: Kosmos2Config, params: Mapping | None = None, leaves=None) -> None:
    """Write config.json + model.safetensors loadable by `Kosmos2ForConditionalGeneration.from_pretrained`,
    from `params`, or from a stream of (path, array) `leaves` in the model's parameter order (as
    `iter_checkpoint_leaves` yields them), writing each tensor as it arrives."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)
    order = list(traverse_util.flatten_dict(abstract_params(Kosmos2(config))).items())
    shapes = {}
    for path, spec in order:
        shape = _to_hf_shape(path, spec.shape[1:] if _layer_of(path)[2] else spec.shape)
        shapes.update((key, shape) for key in hf_keys(path, spec.shape))
    if params is not None:
        flat = traverse_util.flatten_dict(nn.unbox(params))
        leaves = ((path, flat[path]) for path, _ in order)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), leaves_to_hf(leaves), shapes)
