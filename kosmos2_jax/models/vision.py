"""CLIP ViT encoder (KOSMOS-2's ViT-L/14): bias-free patch conv, class token, learned positions,
pre-LayerNorm, pre-LN blocks with quick-GELU MLPs, and a post-LayerNorm that KOSMOS-2 applies to
every token (reference §1.2–1.3). Input pixels are NHWC."""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name
import numpy as np

from kosmos2_jax.models.config import Kosmos2Config
from kosmos2_jax.models.layers import Attention, Dense, activation, constrain, layer_norm, stack_layers
from kosmos2_jax.utils.errors import UsageError


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's bicubic interpolation (align_corners=False, A = -0.75,
    clamped borders), so interpolated position tables match HF's exactly."""
    a = -0.75

    def cubic(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        if t < 2:
            return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
        return 0.0

    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        base = int(np.floor(src))
        frac = src - base
        for k in range(-1, 3):
            m[i, min(max(base + k, 0), in_size - 1)] += cubic(k - frac)
    return m


class VisionBlock(nn.Module):
    config: Kosmos2Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        c, dt, pdt = self.config.vision, jnp.dtype(self.config.dtype), jnp.dtype(self.config.param_dtype)
        h = layer_norm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="layer_norm1")(x)
        h = Attention(c.num_attention_heads, dropout=c.attention_dropout, dtype=dt, param_dtype=pdt,
                      impl=self.config.attention_impl, name="self_attn")(h, deterministic=self.deterministic)
        x = x + h
        h = layer_norm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="layer_norm2")(x)
        h = checkpoint_name(Dense(c.intermediate_size, ("embed", "mlp"), dtype=dt, param_dtype=pdt, name="fc1")(h),
                            "mlp_in")
        h = constrain(activation(c.hidden_act)(h), ("act_batch", "act_len", "act_mlp"))
        h = checkpoint_name(Dense(c.hidden_size, ("mlp", "embed"), dtype=dt, param_dtype=pdt, name="fc2")(h), "mlp_out")
        return constrain(x + h, ("act_batch", "act_len", "act_embed"))


class VisionEncoder(nn.Module):
    """pixel_values [B, H, W, C] -> post-LayerNormed tokens [B, 1 + patches, hidden].

    `embed` (the first layer's input) and `output` (the post-LayerNorm) are the forward's own first
    and last stages, also called alone by generation's per-layer mode."""

    config: Kosmos2Config

    def setup(self):
        c, pdt = self.config.vision, jnp.dtype(self.config.param_dtype)
        self.patch_embedding = patch_embedding(self.config)
        self.class_embedding = self.param(
            "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (c.hidden_size,), pdt)
        self.position_embedding = self.param(
            "position_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("positions", "embed")),
            (c.num_patches + 1, c.hidden_size), pdt)
        self.pre_layrnorm = vision_layer_norm(self.config)
        self.post_layernorm = vision_layer_norm(self.config)

    def embed(self, pixel_values, interpolate_pos_encoding: bool = False):
        """Pixels [B, H, W, C] -> the first layer's input: patches, class token, positions, pre-LayerNorm."""
        c, dt = self.config.vision, jnp.dtype(self.config.dtype)
        b, height, width, _ = pixel_values.shape
        if not interpolate_pos_encoding and (height != c.image_size or width != c.image_size):
            raise UsageError(f"input image size ({height}x{width}) doesn't match the model ({c.image_size}x"
                             f"{c.image_size}); pass interpolate_pos_encoding=True to interpolate positions")
        patches = self.patch_embedding(pixel_values.astype(dt))
        grid_h, grid_w = patches.shape[1:3]
        patches = patches.reshape(b, grid_h * grid_w, c.hidden_size)
        pos = self.position_embedding
        side = c.image_size // c.patch_size
        if interpolate_pos_encoding and (grid_h, grid_w) != (side, side):
            grid = pos[1:].reshape(side, side, c.hidden_size)
            grid = jnp.einsum("ys,xt,std->yxd", bicubic_matrix(side, grid_h).astype(np.float32),
                              bicubic_matrix(side, grid_w).astype(np.float32), grid)
            pos = jnp.concatenate([pos[:1], grid.reshape(grid_h * grid_w, c.hidden_size)], axis=0)
        x = constrain(with_class_and_positions(self.config, patches, self.class_embedding, pos),
                      ("act_batch", "act_len", "act_embed"))
        return self.pre_layrnorm(x)

    def output(self, x):
        """The last layer's output -> the tower's output tokens (the post-LayerNorm)."""
        return self.post_layernorm(x)

    @nn.compact
    def __call__(self, pixel_values, interpolate_pos_encoding: bool = False, deterministic: bool = True):
        x = self.embed(pixel_values, interpolate_pos_encoding)
        x, _ = stack_layers(VisionBlock, self.config.vision.num_hidden_layers, self.config.remat_policy,
                            self.config.scan_layers, "encoder", frozen=self.config.frozen_vision_layers, owner=self,
                            config=self.config, deterministic=deterministic)(x, ())
        return self.output(x)


def patch_embedding(config: Kosmos2Config, name: str | None = None) -> nn.Conv:
    c = config.vision
    return nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size), padding="VALID",
                   use_bias=False, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
                   kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, None, "embed")),
                   name=name)


def with_class_and_positions(config: Kosmos2Config, patches, class_embedding, position_embedding):
    """Patch embeddings [B, N, D] -> [B, 1 + N, D]: the class token first, then the positions added."""
    dt = jnp.dtype(config.dtype)
    cls = jnp.broadcast_to(class_embedding.astype(dt), (patches.shape[0], 1, patches.shape[2]))
    return jnp.concatenate([cls, patches], axis=1) + position_embedding.astype(dt)


def vision_layer_norm(config: Kosmos2Config, name: str | None = None) -> nn.LayerNorm:
    return layer_norm(config.vision.layer_norm_eps, dtype=jnp.dtype(config.dtype),
                      param_dtype=jnp.dtype(config.param_dtype), name=name)
