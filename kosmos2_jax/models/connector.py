"""The image-to-text projection ("resampler", original `XConnector`, reference §1.4): a dense
layer to the text width, then `latent_query_num` learned queries attending over
[projected image tokens; the queries themselves]. No residual, norm or FFN after it."""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from kosmos2_jax.models.config import Kosmos2Config
from kosmos2_jax.models.layers import Attention, Dense, constrain


class ImageToTextProjection(nn.Module):
    config: Kosmos2Config

    @nn.compact
    def __call__(self, features, deterministic: bool = True):
        t, dt, pdt = self.config.text, jnp.dtype(self.config.dtype), jnp.dtype(self.config.param_dtype)
        h = Dense(t.embed_dim, ("embed", "embed_out"), dtype=dt, param_dtype=pdt, name="dense")(features)
        queries = self.param("latent_query", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                           ("queries", "embed")),
                             (self.config.latent_query_num, t.embed_dim), pdt).astype(dt)
        queries = jnp.broadcast_to(queries, (h.shape[0], *queries.shape))
        kv = jnp.concatenate([h, queries], axis=1)
        out = Attention(t.attention_heads, dropout=t.attention_dropout, dtype=dt, param_dtype=pdt,
                        name="x_attn")(queries, kv, deterministic=deterministic)
        return constrain(out, ("act_batch", "act_len", "act_embed"))
