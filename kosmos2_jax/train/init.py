"""Structured initialisation for training from scratch (the demo): 2-D sin-cos tables for the
vision position embeddings and for the location-token embeddings.

With the default N(0, 0.02) init a from-scratch ViT's position signal is ~10x weaker than the patch
content, and the (tied) location-token embeddings carry no notion that token (i, j) neighbours
(i, j+1); a tiny model then learns the caption words long before it learns where anything is.
Starting both from 2-D sin-cos tables (as MAE / big_vision do for positions) gives the encoder a
spatial code and the LM head a smooth output space over the grid. Converted or loaded weights are
never touched: this only rewrites a fresh init.
"""

from __future__ import annotations

import numpy as np

from kosmos2_jax.utils.errors import UsageError


FREQUENCIES = ("log", "linear")


def sincos_2d(side: int, dim: int, temperature: float = 10000.0, frequencies: str = "log") -> np.ndarray:
    """[side * side, dim] table, row-major over (y, x): dim/4 frequencies each of sin/cos of y and x.

    `log`: 1 / temperature^(k / (dim/4)) radians per cell (MAE, big_vision), from 1 down to nearly
    0; on a 16-cell grid most of them are almost constant. `linear`: pi * (k + 1) / (dim/4), evenly
    from low up to pi per cell (the grid's Nyquist frequency): the table can then express a peak one
    cell wide, which is what a location token has to single out."""
    if dim % 4:
        raise UsageError(f"sin-cos 2-D embeddings need a width divisible by 4, got {dim}")
    if frequencies not in FREQUENCIES:
        raise UsageError(f"sin-cos frequencies {frequencies!r} not in {FREQUENCIES}")
    y, x = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")
    k = np.arange(dim // 4, dtype=np.float64)
    omega = 1.0 / temperature ** (k / (dim // 4)) if frequencies == "log" else np.pi * (k + 1) / (dim // 4)
    y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def structured_init(params, model_config, first_location_id: int, num_location_tokens: int,
                    positions: bool = True, locations: bool = True, location_std: float = 0.02,
                    connector_dense_std: float = 0.0, location_frequencies: str = "log",
                    position_frequencies: str = "log"):
    """Return `params` (a plain nested dict of arrays) with the chosen tables rewritten, and with
    the resampler's input projection rescaled to `connector_dense_std` when it is > 0."""
    import jax.numpy as jnp

    params = dict(params)
    if connector_dense_std > 0:
        # The vision tokens reach the resampler L2-normalized (per-dim std ~ 1/sqrt(width)); with the
        # default N(0, 0.02) projection they enter its attention ~50x weaker than the N(0, 1) latent
        # queries, so at init every latent is nearly the same image-independent vector.
        proj = dict(params["image_to_text_projection"])
        dense = dict(proj["dense"])
        kernel = dense["kernel"]
        dense["kernel"] = kernel * (connector_dense_std / jnp.maximum(jnp.std(kernel), 1e-12))
        proj["dense"] = dense
        params["image_to_text_projection"] = proj
    if positions:
        vision = dict(params["vision_model"])
        v = model_config.vision
        side = v.image_size // v.patch_size
        table = np.concatenate([np.zeros((1, v.hidden_size), np.float32),
                                sincos_2d(side, v.hidden_size, frequencies=position_frequencies)])
        old = vision["position_embedding"]
        vision["position_embedding"] = jnp.asarray(table, old.dtype)
        params["vision_model"] = vision
    if locations:
        side = int(round(num_location_tokens ** 0.5))
        if side * side != num_location_tokens:
            raise UsageError(f"num_location_tokens={num_location_tokens} is not a square grid")
        text = dict(params["text_model"])
        embed = dict(text["embed_tokens"])
        table = embed["embedding"]
        grid = sincos_2d(side, table.shape[1], frequencies=location_frequencies) * (location_std / np.sqrt(0.5))  # per-entry std ~= location_std
        embed["embedding"] = table.at[first_location_id:first_location_id + num_location_tokens].set(
            jnp.asarray(grid, table.dtype))
        text["embed_tokens"] = embed
        params["text_model"] = text
    return params
