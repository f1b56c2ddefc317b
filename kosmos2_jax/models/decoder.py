"""The MAGNETO text decoder (reference §1.5–1.7).

Token embeddings (with image embeddings written over the image slots *before* scaling) times
sqrt(embed_dim), plus fairseq sinusoidal positions counted over non-pad tokens; pre-LN blocks with
sub-LN inside attention (`inner_attn_ln`) and inside the FFN (`ffn_layernorm`); a final LayerNorm;
and an LM head tied to the token embeddings.

Embedding dropout is applied once, as in the original code (HF applies it twice in training).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from kosmos2_jax.models.config import Kosmos2Config
from kosmos2_jax.models.layers import Attention, Dense, activation, constrain, layer_norm, stack_layers


def position_ids_from_input_ids(input_ids: jax.Array, pad_token_id: int, past_length: int | jax.Array = 0):
    """fairseq make_positions: pad -> pad_token_id, else pad_token_id + running count of non-pad tokens."""
    not_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return (jnp.cumsum(not_pad, axis=1) + past_length) * not_pad + pad_token_id


def position_ids_from_segments(segment_ids: jax.Array, pad_token_id: int):
    """Positions for packed rows: each segment (1, 2, ... ; 0 = pad) counts its own tokens from
    `pad_token_id + 1`, exactly as it would alone in a row (`position_ids_from_input_ids`)."""
    not_pad = (segment_ids > 0).astype(jnp.int32)
    count = jnp.cumsum(not_pad, axis=1)
    previous = jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
    starts = (segment_ids != previous) & (segment_ids > 0)
    base = jax.lax.cummax(jnp.where(starts, count - 1, 0), axis=1)
    return (count - base) * not_pad + pad_token_id


def sinusoidal_positions(position_ids: jax.Array, dim: int, padding_idx: int) -> jax.Array:
    """Rows of fairseq's table: [sin(p f_0..f_{h-1}), cos(p f_0..f_{h-1})], zero at `padding_idx`."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * jnp.float32(-math.log(10000) / (half - 1)))
    angles = position_ids.astype(jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros((*emb.shape[:-1], 1), emb.dtype)], axis=-1)
    return jnp.where((position_ids == padding_idx)[..., None], 0.0, emb)


def attention_bias(attention_mask: jax.Array, q_len: int, q_offset: jax.Array | int = 0,
                   segment_ids: jax.Array | None = None) -> jax.Array:
    """Additive [B, 1, q_len, kv_len] mask built as HF builds it: causal + key padding, each the
    dtype's minimum where masked (so fully masked rows of pad queries behave identically); with
    `segment_ids` (packed rows) a query also sees only keys of its own segment."""
    kv_len = attention_mask.shape[1]
    neg = jnp.finfo(jnp.float32).min
    q_pos = jnp.arange(q_len)[:, None] + q_offset
    causal = jnp.where(jnp.arange(kv_len)[None, :] > q_pos, neg, 0.0)
    padding = jnp.where(attention_mask[:, None, None, :] == 0, neg, 0.0)
    bias = causal[None, None] + padding
    if segment_ids is not None:
        bias = bias + jnp.where(segment_ids[:, None, :, None] != segment_ids[:, None, None, :], neg, 0.0)
    return bias


def token_embedding(config: Kosmos2Config, name: str | None = None) -> nn.Embed:
    """The token embeddings, also the tied LM head (`attend`)."""
    t = config.text
    return nn.Embed(t.vocab_size, t.embed_dim, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                    name=name)


def final_layer_norm(config: Kosmos2Config, name: str | None = None) -> nn.LayerNorm:
    return layer_norm(config.text.layer_norm_eps, dtype=jnp.dtype(config.dtype),
                      param_dtype=jnp.dtype(config.param_dtype), name=name)


def input_embeddings(config: Kosmos2Config, x, position_ids, image_embeds=None, image_embeds_position_mask=None):
    """Token embeddings `x` [B, T, D] -> the first layer's input: image embeddings written over the
    image slots, scaled by sqrt(embed_dim), plus the sinusoidal positions."""
    t = config.text
    if image_embeds is not None:
        # The k-th slot (row-major over the mask) takes the k-th image embedding of its row.
        mask = image_embeds_position_mask.astype(bool)
        slot = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, image_embeds.shape[1] - 1)
        img = jnp.take_along_axis(image_embeds.astype(x.dtype), slot[..., None], axis=1)
        x = jnp.where(mask[..., None], img, x)
    if t.scale_embedding:
        x = x * jnp.asarray(math.sqrt(t.embed_dim), x.dtype)
    return x + sinusoidal_positions(position_ids, t.embed_dim, t.pad_token_id).astype(x.dtype)


class TextBlock(nn.Module):
    config: Kosmos2Config
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, bias, segment_ids, lengths):
        t, dt, pdt = self.config.text, jnp.dtype(self.config.dtype), jnp.dtype(self.config.param_dtype)
        drop = lambda h: nn.Dropout(t.dropout)(h, deterministic=self.deterministic)
        h = layer_norm(t.layer_norm_eps, dtype=dt, param_dtype=pdt, name="self_attn_layer_norm")(x)
        h = Attention(t.attention_heads, inner_layer_norm_eps=t.layer_norm_eps, dropout=t.attention_dropout,
                      dtype=dt, param_dtype=pdt, impl=self.config.attention_impl,
                      name="self_attn")(h, bias=bias, deterministic=self.deterministic, decode=self.decode,
                                        causal=True, segment_ids=segment_ids, lengths=lengths)
        x = x + drop(h)
        h = layer_norm(t.layer_norm_eps, dtype=dt, param_dtype=pdt, name="final_layer_norm")(x)
        h = FFN(self.config, self.deterministic, name="ffn")(h)
        return constrain(x + drop(h), ("act_batch", "act_len", "act_embed"))


class FFN(nn.Module):
    config: Kosmos2Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        t, dt, pdt = self.config.text, jnp.dtype(self.config.dtype), jnp.dtype(self.config.param_dtype)
        h = checkpoint_name(Dense(t.ffn_dim, ("embed", "mlp"), dtype=dt, param_dtype=pdt, name="fc1")(x), "mlp_in")
        h = constrain(activation(t.activation_function)(h), ("act_batch", "act_len", "act_mlp"))
        h = nn.Dropout(t.activation_dropout)(h, deterministic=self.deterministic)
        h = layer_norm(t.layer_norm_eps, "mlp", dt, pdt, name="ffn_layernorm")(h)
        return checkpoint_name(Dense(t.embed_dim, ("mlp", "embed"), dtype=dt, param_dtype=pdt, name="fc2")(h),
                               "mlp_out")


class TextDecoder(nn.Module):
    """input_ids [B, T] (+ image embeddings for the slots) -> logits [B, T, vocab].

    `attention_mask` is [B, T], or [B, cache_length] with `decode=True`, where the queries sit at
    cache positions `cache_index .. cache_index + T` (the caller passes `position_ids` then).
    `segment_ids` [B, T] (1, 2, ... per packed example, 0 on padding) keep packed examples apart:
    each attends within itself and counts its own positions. With a fused `attention_impl`
    (not "einsum") no [B, 1, T, T] bias is built: the kernels get the causal flag and the segment
    ids, or, for unpacked rows, each row's length — such rows must be right-padded, as the input
    pipeline writes them.

    `embed` (the first layer's input) and `logits` (final LayerNorm and tied LM head) are the
    forward's own first and last stages, also called alone by generation's per-layer mode.
    """

    config: Kosmos2Config

    def setup(self):
        self.embed_tokens = token_embedding(self.config)
        self.layer_norm = final_layer_norm(self.config)

    def embed(self, input_ids, position_ids, image_embeds=None, image_embeds_position_mask=None):
        """Token ids [B, T] -> the first layer's input [B, T, D]: image embeddings written over
        the image slots, scaled by sqrt(embed_dim), plus the sinusoidal positions."""
        return input_embeddings(self.config, self.embed_tokens(input_ids), position_ids, image_embeds,
                                image_embeds_position_mask)

    def logits(self, x):
        """The last layer's output -> logits over the vocabulary (final LayerNorm, tied LM head)."""
        return self.lm_head(self.layer_norm(x))

    def lm_head(self, x):
        """`return_hidden=True`'s output (after the final LayerNorm) -> logits: the tied LM head."""
        return constrain(self.embed_tokens.attend(x), ("act_batch", "act_len", "act_vocab"))

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, image_embeds=None, image_embeds_position_mask=None,
                 position_ids=None, deterministic: bool = True, decode: bool = False, return_hidden: bool = False,
                 segment_ids=None):
        t = self.config.text
        if segment_ids is not None and decode:
            raise ValueError("segment_ids (packed rows) are for training forwards, not cached decoding")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if position_ids is None:
            position_ids = (position_ids_from_input_ids(input_ids, t.pad_token_id) if segment_ids is None
                            else position_ids_from_segments(segment_ids, t.pad_token_id))
        x = self.embed(input_ids, position_ids, image_embeds, image_embeds_position_mask)
        x = nn.Dropout(t.dropout)(x, deterministic=deterministic)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))

        q_offset = 0
        if decode:  # queries sit at cache positions index .. index + T
            index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
            q_offset = index.value
            if self.is_mutable_collection("cache") and self.has_variable("cache", "index"):
                index.value = index.value + input_ids.shape[1]
        if self.config.attention_impl == "einsum" or decode:
            masks = (attention_bias(attention_mask, input_ids.shape[1], q_offset, segment_ids), None, None)
        elif segment_ids is not None:  # the fused kernels take the causal flag and segments, no bias
            masks = (None, segment_ids, None)
        else:  # training and scoring rows are right-padded: their lengths
            masks = (None, None, jnp.sum(attention_mask, axis=1, dtype=jnp.int32))
        x, _ = stack_layers(TextBlock, t.layers, self.config.remat_policy, self.config.text_layers_scanned, "layers",
                            config=self.config, deterministic=deterministic, decode=decode)(x, masks)
        if return_hidden:
            return self.layer_norm(x)
        return self.logits(x)
