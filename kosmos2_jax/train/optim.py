"""Optimizer: AdamW with linear warm-up and linear decay to zero (the paper's schedule), global-norm
clipping, gradient accumulation, and parameter freezing by masking updates."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

FREEZE_MODES = ("none", "vision_except_last", "all_but_resampler")


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, end: float = 0.0):
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    decay = optax.linear_schedule(peak, end, max(total_steps - warmup_steps, 1))
    return optax.join_schedules([warmup, decay], [warmup_steps])


def trainable_mask(params, mode: str, scan_layers: bool = True):
    """A tree of 0/1 multipliers (broadcastable to each param) saying what is trained.

    `vision_except_last`: the vision tower is frozen except its last encoder layer and the post
    LayerNorm (the paper's setting); `all_but_resampler`: only the image-to-text projection trains.
    """
    if mode not in FREEZE_MODES:
        raise ValueError(f"freeze mode {mode!r} not in {FREEZE_MODES}")
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


def mask_updates(mask) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        return jax.tree_util.tree_map(lambda u, m: u * m.astype(u.dtype), updates, mask), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg, mask=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`cfg`: lr, warmup_steps, total_steps, b1, b2, eps, weight_decay, clip_norm."""
    schedule = learning_rate_schedule(cfg.lr, cfg.warmup_steps, cfg.total_steps)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    if mask is not None:
        parts.append(mask_updates(mask))
    return optax.chain(*parts), schedule
