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


FREQUENCIES = ("log", "linear")


def sincos_2d(side: int, dim: int, temperature: float = 10000.0, frequencies: str = "log") -> np.ndarray:
    """[side * side, dim] table, row-major over (y, x): dim/4 frequencies each of sin/cos of y and x.

    `log`: 1 / temperature^(k / (dim/4)) radians per cell (MAE, big_vision), from 1 down to nearly
    0; on a 16-cell grid most of them are almost constant. `linear`: pi * (k + 1) / (dim/4), evenly
    from low up to pi per cell (the grid's Nyquist frequency): the table can then express a peak one
    cell wide, which is what a location token has to single out."""
    if dim % 4:
        raise ValueError(f"sin-cos 2-D embeddings need a width divisible by 4, got {dim}")
    if frequencies not in FREQUENCIES:
        raise ValueError(f"sin-cos frequencies {frequencies!r} not in {FREQUENCIES}")
    y, x = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")
    k = np.arange(dim // 4, dtype=np.float64)
    omega = 1.0 / temperature ** (k / (dim // 4)) if frequencies == "log" else np.pi * (k + 1) / (dim // 4)
    y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def spatial_latents(position_table: np.ndarray, num_latents: int, sigma: float = 0.75) -> np.ndarray:
    """[num_latents, width] unit vectors, latent i a Gaussian-weighted (`sigma` patches) sum of the
    patch position codes (`position_table` [side * side, width], row-major) around the i-th cell
    centre of a sqrt(num_latents)-square grid laid over the patches."""
    side, grid = int(round(len(position_table) ** 0.5)), int(round(num_latents ** 0.5))
    if side * side != len(position_table) or grid * grid != num_latents:
        raise ValueError(f"spatial latents need square grids: {len(position_table)} patches, {num_latents} latents")
    centres = (np.arange(grid) + 0.5) * side / grid - 0.5  # patch coordinates
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    py, px = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    d2 = (cy.reshape(-1, 1) - py.reshape(1, -1)) ** 2 + (cx.reshape(-1, 1) - px.reshape(1, -1)) ** 2
    weights = np.exp(-d2 / (2 * sigma ** 2))
    codes = position_table / np.linalg.norm(position_table, axis=1, keepdims=True)
    mixed = weights @ codes
    return (mixed / np.linalg.norm(mixed, axis=1, keepdims=True)).astype(np.float32)


def structured_init(params, model_config, first_location_id: int, num_location_tokens: int,
                    positions: bool = True, locations: bool = True, location_std: float = 0.02,
                    connector_dense_std: float = 0.0, location_frequencies: str = "log",
                    position_frequencies: str = "log", spatial_latent_logit: float = 0.0):
    """Return `params` (a plain nested dict of arrays) with the chosen tables rewritten, with the
    resampler's input projection rescaled to `connector_dense_std` when it is > 0, and, when
    `spatial_latent_logit` > 0, latent queries that each look at one region of the image."""
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
            raise ValueError(f"num_location_tokens={num_location_tokens} is not a square grid")
        text = dict(params["text_model"])
        embed = dict(text["embed_tokens"])
        table = embed["embedding"]
        grid = sincos_2d(side, table.shape[1], frequencies=location_frequencies) * (location_std / np.sqrt(0.5))  # per-entry std ~= location_std
        embed["embedding"] = table.at[first_location_id:first_location_id + num_location_tokens].set(
            jnp.asarray(grid, table.dtype))
        text["embed_tokens"] = embed
        params["text_model"] = text
    if spatial_latent_logit > 0:
        params["image_to_text_projection"] = _spatial_resampler(params, model_config, spatial_latent_logit)
    return params


def _spatial_resampler(params, model_config, peak_logit: float):
    """The resampler with latent i attending to the patches around the i-th cell of a grid.

    At the default init its q/k projections are ~N(0, 0.02), so every latent attends uniformly and
    all latents start as the same average of the image: where things are is lost until the
    projections grow. Here q_proj = k_proj = a * I and latent i = alpha * (c_i @ W), where W is the
    input projection and c_i a unit mix of the patch position codes around cell i; a vision token
    u_j (unit norm, L2-normalized before W) then scores a^2 * alpha * c_i W W^T u_j / sqrt(head_dim)
    ~ a^2 * alpha * width * (c_i . u_j) / sqrt(head_dim), largest for the patches near cell i (their
    position code is a share of u_j). alpha = 0.3 keeps a latent's score for itself (~a^2 alpha^2
    width / sqrt(head_dim)) below its region's; `peak_logit` sets a^2 for a region score of about that
    size with a position share of 1/2."""
    import jax.numpy as jnp

    v, t = model_config.vision, model_config.text
    table = np.asarray(params["vision_model"]["position_embedding"])[1:]  # without the class token's
    proj = {k: dict(val) if isinstance(val, dict) else val for k, val in params["image_to_text_projection"].items()}
    kernel = np.asarray(proj["dense"]["kernel"], np.float64)  # [vision width, text width]
    alpha, width, head_dim = 0.3, t.embed_dim, t.embed_dim // t.attention_heads
    a2 = peak_logit * np.sqrt(head_dim) / (alpha * np.sum(kernel ** 2) / kernel.shape[0] * 0.5)
    codes = spatial_latents(table, model_config.latent_query_num)
    proj["latent_query"] = jnp.asarray(alpha * codes @ kernel, proj["latent_query"].dtype)
    attn = {k: dict(val) for k, val in proj["x_attn"].items()}
    for name in ("q_proj", "k_proj"):
        attn[name]["kernel"] = jnp.asarray(np.sqrt(a2) * np.eye(width), attn[name]["kernel"].dtype)
        attn[name]["bias"] = jnp.zeros_like(attn[name]["bias"])
    proj["x_attn"] = attn
    return proj
