"""Optimizer: AdamW (or Muon on the dense kernels) with linear warm-up and linear (the paper's
schedule) or cosine decay to zero, global-norm clipping, a weight-decay mask, per-parameter
learning-rate multipliers, and parameter freezing: the optimizer (and its state) covers the
trained parameters only."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
from flax import traverse_util

from kosmos2_jax.utils.errors import UsageError

FREEZE_MODES = ("none", "vision_except_last", "all_but_resampler")


DECAYS = ("linear", "cosine")


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, end: float = 0.0,
                           decay: str = "linear"):
    """Linear warm-up to `peak`, then `decay` ("linear" or "cosine") to `end` at `total_steps`."""
    if decay not in DECAYS:
        raise UsageError(f"optim.decay={decay!r} not in {DECAYS}")
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    steps = max(total_steps - warmup_steps, 1)
    after = (optax.linear_schedule(peak, end, steps) if decay == "linear" else
             optax.cosine_decay_schedule(peak, steps, alpha=end / peak if peak else 0.0))
    return optax.join_schedules([warmup, after], [warmup_steps])


def trainable_mask(params, mode: str, scan_layers: bool = True):
    """A tree of 0/1 multipliers (broadcastable to each param) saying what is trained.

    `vision_except_last`: the vision tower is frozen except its last encoder layer and the post
    LayerNorm (the paper's setting); `all_but_resampler`: only the image-to-text projection trains.
    """
    if mode not in FREEZE_MODES:
        raise UsageError(f"freeze mode {mode!r} not in {FREEZE_MODES}")
    flat = traverse_util.flatten_dict(params)
    vision_layers = [int(m.group(1)) for p in flat if p[:2] == ("vision_model", "encoder")
                     for m in [re.fullmatch(r"layer_(\d+)", p[2])] if m]  # unscanned layers only
    out = {}
    for path, value in flat.items():
        if mode == "none":
            out[path] = jnp.ones((), jnp.float32)
        elif mode == "all_but_resampler":
            out[path] = jnp.asarray(float(path[0] == "image_to_text_projection"), jnp.float32)
        elif path[0] != "vision_model" or path[1] == "post_layernorm":
            out[path] = jnp.ones((), jnp.float32)
        elif path[1] == "encoder" and scan_layers:
            layers = value.shape[0]
            out[path] = (jnp.arange(layers) == layers - 1).astype(jnp.float32).reshape((layers,) + (1,) * (value.ndim - 1))
        elif path[1] == "encoder":
            out[path] = jnp.asarray(float(path[2] == f"layer_{max(vision_layers)}"), jnp.float32)
        else:
            out[path] = jnp.zeros((), jnp.float32)
    return traverse_util.unflatten_dict(out)


def _kept(mask_leaf):
    """True (trained), False (frozen) or the trained layers' indices (a per-layer mask)."""
    m = np.asarray(mask_leaf)
    if m.ndim == 0:
        return bool(m != 0)
    layers = np.flatnonzero(m.reshape(m.shape[0], -1)[:, 0])
    return True if len(layers) == m.shape[0] else (False if len(layers) == 0 else layers)


def _take_layers(leaf, layers):
    contiguous = layers[-1] - layers[0] + 1 == len(layers)
    take = (lambda a: a[layers[0]:layers[-1] + 1]) if contiguous else (lambda a: a[layers])
    if isinstance(leaf, nn.LogicallyPartitioned):
        return leaf.replace_boxed(take(leaf.value))
    return take(leaf)


def trained_only(inner: optax.GradientTransformation, mask) -> optax.GradientTransformation:
    """`inner` on the trained part of the parameters alone: a frozen leaf has no optimizer state
    (`optax.MaskedNode`), a partly frozen stack (`trainable_mask`'s per-layer multipliers) state for
    its trained layers only; frozen parts get zero updates. (optax.masked would keep whole leaves.)"""
    is_leaf = lambda x: isinstance(x, nn.LogicallyPartitioned)
    kept = [_kept(m) for m in jax.tree_util.tree_leaves(mask)]

    def part(tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_leaf)
        if len(leaves) != len(kept):
            raise ValueError(f"the trainable mask has {len(kept)} leaves, the parameters {len(leaves)}")
        return treedef.unflatten([leaf if k is True else optax.MaskedNode() if k is False else _take_layers(leaf, k)
                                  for leaf, k in zip(leaves, kept)])

    def update(updates, state, params=None):
        new, state = inner.update(part(updates), state, None if params is None else part(params))
        full, treedef = jax.tree_util.tree_flatten(updates)
        new = jax.tree_util.tree_flatten(new, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
        out = [n if k is True else jnp.zeros_like(u) if k is False else jnp.zeros_like(u).at[k].set(n)
               for u, n, k in zip(full, new, kept)]
        return treedef.unflatten(out), state

    return optax.GradientTransformation(lambda params: inner.init(part(params)), update)


WEIGHT_DECAY_MASKS = ("all", "matrices")


def _last_key(path):
    """A parameter's name ("kernel", "bias", "embedding", ...) from its tree path."""
    return next((k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey)), None)


def weight_decay_mask(name: str):
    """`optim.weight_decay_mask`: "all" decays every parameter, as the released training code
    (fairseq's Adam with --weight-decay) does; "matrices" only kernels and embeddings (no biases,
    LayerNorms, class embedding or position tables)."""
    if name not in WEIGHT_DECAY_MASKS:
        raise UsageError(f"optim.weight_decay_mask {name!r} not in {WEIGHT_DECAY_MASKS}")
    if name == "all":
        return None

    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: _last_key(path) in ("kernel", "embedding"), params)


def _param_path(path) -> str:
    """"text_model/layers/layer_0/ffn/fc1/kernel": the dict keys of a parameter's tree path."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def parse_lr_multipliers(spec: str) -> list[tuple[re.Pattern, float]]:
    """`optim.lr_multipliers`, "REGEX=FACTOR,REGEX=FACTOR" -> [(pattern, factor)]. A parameter's
    learning rate is multiplied by the factor of the first pattern found (re.search) in its path,
    e.g. "image_to_text_projection/x_attn/(q|k)_proj=0.25"; no match: 1."""
    rules = []
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        pattern, sep, factor = item.rpartition("=")
        try:
            rules.append((re.compile(pattern), float(factor)))
            if not sep or not pattern or rules[-1][1] < 0:
                raise ValueError
        except (re.error, ValueError):
            raise UsageError(f"optim.lr_multipliers: {item!r} is not REGEX=FACTOR (a factor >= 0)") from None
    return rules


def lr_multipliers(params, spec: str) -> dict[str, float]:
    """{path: factor} for the parameters of `params` that `spec` changes; a pattern that matches
    no parameter is an error (a typo would otherwise change nothing)."""
    rules = parse_lr_multipliers(spec)
    paths = [_param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    for pattern, _ in rules:
        if not any(pattern.search(p) for p in paths):
            raise UsageError(f"optim.lr_multipliers: {pattern.pattern!r} matches no parameter")
    return {p: f for p in paths for f in [next((f for pat, f in rules if pat.search(p)), 1.0)] if f != 1.0}


def scale_by_path(spec: str) -> optax.GradientTransformation:
    """Multiplies each parameter's update by its `parse_lr_multipliers` factor: after AdamW that
    scales its learning rate (and its weight decay with it)."""
    rules = parse_lr_multipliers(spec)

    def factor(path):
        p = _param_path(path)
        return next((f for pattern, f in rules if pattern.search(p)), 1.0)

    def update(updates, state, params=None):
        return jax.tree_util.tree_map_with_path(
            lambda path, u: u if factor(path) == 1.0 else u * jnp.asarray(factor(path), u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


OPTIMIZERS = ("adamw", "muon")


def muon_matrices(params):
    """Muon's dimension numbers: the dense kernels, `[in, out]` or a scanned stack `[layers, in,
    out]` (each layer's matrix orthogonalized on its own); embeddings (and so the tied LM head),
    latent queries, position tables, the 4-D patch kernel, biases and norms: None (AdamW)."""
    from optax.contrib import MuonDimensionNumbers

    return jax.tree_util.tree_map_with_path(
        lambda path, x: MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)
        if _last_key(path) == "kernel" and x.ndim in (2, 3) else None, params)


def muon(schedule, cfg) -> optax.GradientTransformation:
    """`optim.optimizer="muon"`: Muon (momentum 0.95, Nesterov, `muon_ns_steps` Newton-Schulz steps) on
    `muon_matrices`, its updates scaled to an RMS of 0.2 x lr (`consistent_rms`, Moonshot's
    matching of AdamW's update size, so AdamW's lr and weight decay carry over); AdamW with
    b1, b2, eps on the rest (optax.contrib.muon's: with Nesterov momentum there too). Both decay
    every parameter they update by `weight_decay` (weight_decay_mask "all" only)."""
    if cfg.weight_decay_mask != "all":
        raise UsageError("optim.optimizer='muon' decays every parameter: it needs optim.weight_decay_mask='all'")
    from optax.contrib import muon as optax_muon

    return optax_muon(schedule, ns_steps=cfg.muon_ns_steps, beta=0.95, weight_decay=cfg.weight_decay,
                      adam_b1=cfg.b1, adam_b2=cfg.b2, eps=cfg.eps, adam_weight_decay=cfg.weight_decay,
                      muon_weight_dimension_numbers=muon_matrices, consistent_rms=0.2)


def make_optimizer(cfg, mask=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`cfg`: the config's `optim` (train/presets.py: every key with its default). With `mask` (`trainable_mask`) the optimizer runs on the trained
    parameters only (`trained_only`)."""
    schedule = learning_rate_schedule(cfg.lr, cfg.warmup_steps, cfg.total_steps, decay=cfg.decay)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    optimizer = cfg.optimizer
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"optim.optimizer={optimizer!r} not in {OPTIMIZERS}")
    if optimizer == "muon":
        parts.append(muon(schedule, cfg))
    else:
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 mask=weight_decay_mask(cfg.weight_decay_mask)))
    if cfg.lr_multipliers:
        parts.append(scale_by_path(cfg.lr_multipliers))
    tx = optax.chain(*parts)
    return (tx if mask is None else trained_only(tx, mask)), schedule
