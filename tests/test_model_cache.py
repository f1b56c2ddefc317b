"""Cached decoding (the `cache` collection) gives the full forward's logits at every step."""

import jax
import jax.numpy as jnp
import numpy as np

from kosmos2_jax.models import Kosmos2, init_cache, tiny
from kosmos2_jax.models.decoder import position_ids_from_input_ids


def _setup(scan=True):
    config = tiny(vocab_size=120, scan_layers=scan)
    model = Kosmos2(config)
    q = config.latent_query_num
    rng = np.random.default_rng(0)
    prompt = np.ones((2, q + 8), np.int32)
    prompt[0] = np.concatenate([[0, 5], np.arange(4, 4 + q), [6], rng.integers(7, 120, 5)])
    prompt[1, 3:] = np.concatenate([[0, 5], np.arange(4, 4 + q), [6], rng.integers(7, 120, 2)])  # left padded
    img_mask = np.zeros_like(prompt)
    img_mask[0, 2:2 + q] = 1
    img_mask[1, 5:5 + q] = 1
    pixels = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), pixels, prompt, (prompt != 1).astype(np.int32), img_mask)["params"]
    return model, params, pixels, prompt, img_mask, rng


def _check(scan):
    model, params, pixels, prompt, img_mask, rng = _setup(scan)
    steps, max_len = 6, prompt.shape[1] + 6
    new = rng.integers(7, 120, (2, steps)).astype(np.int32)
    full = np.concatenate([prompt, new], axis=1)
    full_mask = (full != 1).astype(np.int32)
    full_img = np.concatenate([img_mask, np.zeros_like(new)], axis=1)
    ref = model.apply({"params": params}, pixels, full, full_mask, full_img)

    cache = init_cache(model, 2, max_len)
    positions = np.asarray(position_ids_from_input_ids(jnp.asarray(full), 1))
    p = prompt.shape[1]
    logits, state = model.apply({"params": params, "cache": cache}, pixels, prompt, full_mask, img_mask,
                                position_ids=positions[:, :p], decode=True, mutable=["cache"])
    np.testing.assert_allclose(logits[:, -1], ref[:, p - 1], atol=1e-4)
    cache = state["cache"]
    step_fn = jax.jit(lambda cache, ids, pos: model.apply({"params": params, "cache": cache}, ids, full_mask, pos,
                                                          method=Kosmos2.decode_step, mutable=["cache"]))
    for t in range(steps):
        logits, state = step_fn(cache, full[:, p + t:p + t + 1], positions[:, p + t:p + t + 1])
        cache = state["cache"]
        np.testing.assert_allclose(logits[:, 0], ref[:, p + t], atol=1e-4)


def test_cached_decoding_equals_full_forward():
    _check(scan=True)


def test_cached_decoding_unscanned():
    _check(scan=False)


def test_dropout_only_in_training():
    model, params, pixels, prompt, img_mask, _ = _setup()
    mask = (prompt != 1).astype(np.int32)
    eval_a = model.apply({"params": params}, pixels, prompt, mask, img_mask)
    eval_b = model.apply({"params": params}, pixels, prompt, mask, img_mask, deterministic=True)
    np.testing.assert_array_equal(eval_a, eval_b)
    train = lambda seed: model.apply({"params": params}, pixels, prompt, mask, img_mask, deterministic=False,
                                     rngs={"dropout": jax.random.PRNGKey(seed)})
    np.testing.assert_array_equal(train(1), train(1))
    assert np.abs(train(1) - eval_a).max() > 1e-3 and np.abs(train(1) - train(2)).max() > 1e-3


def test_several_images_per_row_fill_their_slots_in_order():
    """pixel_values [B, N, H, W, 3]: the i-th group of slots takes the i-th image's embeddings,
    exactly as if those embeddings were passed precomputed (the single-image path is HF's)."""
    config = tiny(vocab_size=120)
    model = Kosmos2(config)
    q = config.latent_query_num
    rng = np.random.default_rng(1)
    ids = np.concatenate([[0, 5], np.arange(4, 4 + q), [6], [30, 31], [5], np.arange(4, 4 + q), [6], [40]])[None]
    img_mask = np.zeros_like(ids)
    img_mask[0, 2:2 + q] = 1
    img_mask[0, 5 + q:5 + 2 * q] = 1
    pixels = rng.standard_normal((1, 2, 28, 28, 3)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), pixels, ids, None, img_mask)["params"]
    feats = model.apply({"params": params}, pixels, method=Kosmos2.image_features)
    first = model.apply({"params": params}, pixels[:, 0], method=Kosmos2.image_features)
    second = model.apply({"params": params}, pixels[:, 1], method=Kosmos2.image_features)
    np.testing.assert_allclose(feats, np.concatenate([first, second], axis=1), atol=1e-6)
    logits = model.apply({"params": params}, pixels, ids, None, img_mask)
    expected = model.apply({"params": params}, None, ids, None, img_mask, image_embeds=jnp.concatenate([first, second], 1))
    np.testing.assert_allclose(logits, expected, atol=1e-6)
    swapped = model.apply({"params": params}, pixels[:, ::-1], ids, None, img_mask)
    expected = model.apply({"params": params}, None, ids, None, img_mask, image_embeds=jnp.concatenate([second, first], 1))
    np.testing.assert_allclose(swapped, expected, atol=1e-6)
    assert np.abs(swapped - logits).max() > 1e-5  # the order matters
