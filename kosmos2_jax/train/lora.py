"""LoRA and QLoRA adapters through Qwix (`config.train.lora`).

`apply(model, cfg.train.lora)` wraps the model with `qwix.apply_lora_to_model`: every dense layer
whose module path fully matches `targets` (`text_model/layers/layer_3/self_attn/q_proj`; scanned
stacks are `.../layers/layer/...`) gets `kernel_lora_a` [in, rank] and `kernel_lora_b` [rank,
out] beside its kernel (a scanned stack: a leading layers axis), B zero-initialised, so a fresh
adapter changes nothing; the layer computes `x @ kernel + (x @ A) @ B * alpha / rank`. With
`base_dtype` int8 or nf4 (QLoRA) the adapted kernels are held quantized (Qwix's PTQ arrays,
int8 or 4-bit NormalFloat values with per-output-channel scales) and dequantized in the matmul.

Only the adapters train (`trainable_mask`): the rest of the model, the vision tower included,
is frozen and has no optimizer state. `merge` folds the adapters into plain params for the model
without Qwix (what `export`, `predict`, `evaluate`, `serve` and `convert to-hf` read);
`adapters` keeps them alone (`export --adapters_only`).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kosmos2_jax.utils.errors import UsageError

ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# the decoder's attention and MLP projections, scanned (`layer`) or not (`layer_N`)
DEFAULT_TARGETS = r"text_model/layers/layer(_\d+)?/(self_attn/(q|k|v|out)_proj|ffn/fc[12])"
BASE_DTYPES = ("float", "int8", "nf4")


def enabled(lora) -> bool:
    return bool(lora is not None and lora.rank > 0)


def check(lora) -> None:
    """One-line errors for a bad `train.lora` before anything is built."""
    if lora.rank < 0:
        raise UsageError(f"config.train.lora.rank={lora.rank}: must be >= 0 (0 = no adapters)")
    if not enabled(lora):
        return
    if lora.alpha <= 0:
        raise UsageError(f"config.train.lora.alpha={lora.alpha}: must be > 0")
    if lora.base_dtype not in BASE_DTYPES:
        raise UsageError(f"config.train.lora.base_dtype={lora.base_dtype!r} not in {BASE_DTYPES}")
    try:
        re.compile(lora.targets)
    except re.error as e:
        raise UsageError(f"config.train.lora.targets={lora.targets!r} is not a regular expression: {e}") from None


def apply(model, lora):
    """`model` with Qwix's LoRA (and QLoRA) on the `lora.targets` layers; `model` itself when
    `lora.rank` is 0. The result is a subclass of the model's class with the same fields."""
    if not enabled(lora) or hasattr(type(model), "_unquantized_type"):  # off, or already applied
        return model
    import qwix

    check(lora)
    qtype = None if lora.base_dtype == "float" else lora.base_dtype
    rule = qwix.LoraRule(module_path=lora.targets, rank=int(lora.rank), alpha=float(lora.alpha), weight_qtype=qtype)
    return qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))


def base_model(model):
    """The model without Qwix (the plain class, same fields): what reads merged params."""
    plain = getattr(type(model), "_unquantized_type", None)
    return model if plain is None else plain(model.config)


def is_adapter(path) -> bool:
    """True for a `kernel_lora_a` / `kernel_lora_b` leaf (a key path or a tuple of dict keys)."""
    keys = [getattr(k, "key", k) for k in path]
    return any(isinstance(k, str) and k.endswith(ADAPTER_SUFFIXES) for k in keys)


def trainable_mask(params):
    """1 on the adapters, 0 elsewhere (scalar multipliers, one per leaf, as optim.trainable_mask)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: jnp.asarray(float(is_adapter(path)), jnp.float32),
                                            params)


def count_adapters(params) -> int:
    return sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(params) if is_adapter(path))


def require_adapters(params, lora) -> None:
    if not count_adapters(params):
        raise UsageError(f"config.train.lora.targets={lora.targets!r} matches no dense layer of the model "
                         f"(module paths such as text_model/layers/layer_0/self_attn/q_proj; scanned: layer)")


def _dense(leaf):
    """A kernel as a float array: itself, or a Qwix `WithAux` (QLoRA) dequantized."""
    if hasattr(leaf, "array") and hasattr(leaf, "how"):
        from qwix._src.core import qarray

        return qarray.dequantize(leaf.array)
    return leaf


def merge(params, lora):
    """Plain params (no adapters, float kernels): each adapted kernel becomes `kernel + A @ B *
    alpha / rank` (per layer for a scanned stack). Jittable; sharded params stay sharded."""
    flat = traverse_util.flatten_dict(params, is_leaf=lambda _, x: hasattr(x, "how"))
    scale = float(lora.alpha) / float(lora.rank)
    out = {}
    for path, value in flat.items():
        if is_adapter(path):
            continue
        a = flat.get(path[:-1] + (path[-1] + "_lora_a",))
        value = _dense(value)
        if a is not None:
            b = flat[path[:-1] + (path[-1] + "_lora_b",)]
            delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
            value = (value.astype(jnp.float32) + scale * delta).astype(value.dtype)
        out[path] = value
    return traverse_util.unflatten_dict(out)


def adapters(params):
    """The adapter leaves alone, in their place in the tree."""
    flat = traverse_util.flatten_dict(params, is_leaf=lambda _, x: hasattr(x, "how"))
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if is_adapter(p)})


def with_base(params, base):
    """`params` (a LoRA model's: adapters and base) with the base leaves taken from `base` (plain
    params, e.g. the released model's), quantized where `params` holds them quantized (QLoRA). A
    scanned stack is quantized one layer at a time, as the scan body sees it (Qwix's
    `quantize_params` would take the layers axis for a channel); scanned stacks are named `layer`."""
    from qwix._src.core import qarray

    flat = traverse_util.flatten_dict(params, is_leaf=lambda _, x: hasattr(x, "how"))
    given = traverse_util.flatten_dict(base)
    out = {}
    for path, value in flat.items():
        if is_adapter(path):
            out[path] = value
            continue
        if path not in given:
            raise UsageError(f"the initial params have no {'/'.join(path)}")
        new = jnp.asarray(given[path])
        if hasattr(value, "how"):  # QLoRA: quantized as the model's own init does
            quantize = lambda w: qarray.quantize(w, value.how)
            new = value.replace(array=jax.vmap(quantize)(new) if "layer" in path else quantize(new))
        out[path] = new
    return traverse_util.unflatten_dict(out)


def with_adapters(params, saved):
    """`params` with their adapter leaves replaced by `saved`'s (`adapters` of a checkpoint)."""
    flat = traverse_util.flatten_dict(params, is_leaf=lambda _, x: hasattr(x, "how"))
    flat.update(traverse_util.flatten_dict(saved))
    return traverse_util.unflatten_dict(flat)
