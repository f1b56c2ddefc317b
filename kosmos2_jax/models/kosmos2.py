"""KOSMOS-2: vision encoder -> L2-normalized tokens -> resampler -> image embeddings written into
the decoder's token sequence at `image_embeds_position_mask` (reference §1.2).

    model = Kosmos2(config)
    logits = model.apply({"params": params}, pixel_values, input_ids, attention_mask, image_embeds_position_mask)
    feats = model.apply({"params": params}, pixel_values, method=Kosmos2.image_features)

`pixel_values` are NHWC, [B, H, W, 3]; interleaved prompts with several images per row pass
[B, N, H, W, 3], and the row's image slots take the N images' embeddings in order (the decoder
fills the k-th slot with the k-th embedding). Pass `pixel_values=None` (or precomputed
`image_embeds`) for text only. Packed training rows (several examples per row) pass `segment_ids`.
Training batches may pass only their real images, compacted (`train/image_slots.py`):
`pixel_values` [groups * capacity, H, W, 3] with `image_index` [groups, rows / groups, slots].
Cached decoding: `init_cache` creates a `cache` collection of a given length; then call with
`decode=True, mutable=["cache"]`, giving `position_ids` and an `attention_mask` over the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from kosmos2_jax.models.config import Kosmos2Config
from kosmos2_jax.models.connector import ImageToTextProjection
from kosmos2_jax.models.decoder import TextDecoder
from kosmos2_jax.models.vision import VisionEncoder


def l2_normalize(x, eps: float = 1e-12):
    """torch.nn.functional.normalize: x / max(||x||, eps), in float32."""
    x32 = x.astype(jnp.float32)
    return (x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), eps)).astype(x.dtype)


def gather_image_embeds(feats, image_index):
    """Embeddings of compacted images [groups * capacity, Q, D] -> each row's slots in order
    [rows, slots * Q, D], slot k of a row taking `feats[group * capacity + image_index[group, row, k]]`.
    Batched over groups, so that a batch sharded over groups gathers on each device's own rows."""
    groups, group_rows, slots = image_index.shape
    feats = feats.reshape(groups, -1, *feats.shape[1:])  # [groups, capacity, Q, D]
    rows = jax.vmap(lambda f, i: f[i])(feats, image_index)  # [groups, group_rows, slots, Q, D]
    return rows.reshape(groups * group_rows, slots * feats.shape[2], feats.shape[3])


class Kosmos2(nn.Module):
    config: Kosmos2Config

    def setup(self):
        self.vision_model = VisionEncoder(self.config)
        self.image_to_text_projection = ImageToTextProjection(self.config)
        self.text_model = TextDecoder(self.config)

    def image_features(self, pixel_values, interpolate_pos_encoding: bool = False, deterministic: bool = True):
        """pixel_values [B, H, W, 3] -> image embeddings [B, latent_query_num, embed_dim];
        [B, N, H, W, 3] -> [B, N * latent_query_num, embed_dim] (the N images in order)."""
        if pixel_values.ndim == 5:
            b, n = pixel_values.shape[:2]
            feats = self.image_features(pixel_values.reshape(b * n, *pixel_values.shape[2:]),
                                        interpolate_pos_encoding, deterministic)
            return feats.reshape(b, n * feats.shape[1], feats.shape[2])
        return self.project_image_tokens(self.vision_model(pixel_values, interpolate_pos_encoding, deterministic),
                                         deterministic)

    def project_image_tokens(self, tokens, deterministic: bool = True):
        """The vision tower's output tokens -> image embeddings (L2-normalized, then resampled)."""
        return self.image_to_text_projection(l2_normalize(tokens), deterministic)

    def __call__(self, pixel_values, input_ids, attention_mask=None, image_embeds_position_mask=None,
                 image_embeds=None, position_ids=None, deterministic: bool = True, decode: bool = False,
                 interpolate_pos_encoding: bool = False, return_hidden: bool = False, segment_ids=None,
                 image_index=None):
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.image_features(pixel_values, interpolate_pos_encoding, deterministic)
            if image_index is not None:
                image_embeds = gather_image_embeds(image_embeds, image_index)
        if image_embeds is not None and image_embeds_position_mask is None:
            raise ValueError("image inputs need image_embeds_position_mask (1 on the image slots)")
        return self.text_model(input_ids, attention_mask, image_embeds, image_embeds_position_mask, position_ids,
                               deterministic=deterministic, decode=decode, return_hidden=return_hidden,
                               segment_ids=segment_ids)

    def decode_step(self, input_ids, attention_mask, position_ids, image_embeds=None, image_embeds_position_mask=None,
                    last_only: bool = False):
        """One cached step (or a cached prefill): logits for `input_ids` given the `cache` collection
        (`last_only`: for the last position alone, [B, 1, vocab], as a prefill needs)."""
        x = self.text_model(input_ids, attention_mask, image_embeds, image_embeds_position_mask, position_ids,
                            deterministic=True, decode=True, return_hidden=True)
        return self.text_model.lm_head(x[:, -1:] if last_only else x)

    # The towers' first and last stages, as the forward runs them; generation's per-layer mode calls
    # them around its own loop over the blocks (`inference/generate.py`).
    def embed_pixels(self, pixel_values):
        """Pixels [B, H, W, 3] of the model's size -> the vision tower's first layer's input."""
        return self.vision_model.embed(pixel_values)

    def image_embeds_from_layers(self, x):
        """The vision tower's last layer's output -> image embeddings [B, latent_query_num, D]."""
        return self.project_image_tokens(self.vision_model.output(x))

    def embed_text(self, input_ids, position_ids, image_embeds=None, image_embeds_position_mask=None):
        """Token ids -> the decoder's first layer's input."""
        return self.text_model.embed(input_ids, position_ids, image_embeds, image_embeds_position_mask)

    def lm_logits(self, x):
        """The decoder's last layer's output -> logits (final LayerNorm, tied LM head)."""
        return self.text_model.logits(x)


def init_cache(model: Kosmos2, batch_size: int, max_length: int):
    """An empty `cache` collection for `batch_size` rows of `max_length` positions."""
    ids = jnp.ones((batch_size, max_length), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), None, ids, decode=True))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])
