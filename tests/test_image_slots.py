"""Compacting a batch's real images (train/image_slots.py) and gathering their embeddings back
(models/kosmos2.gather_image_embeds): every real slot gets its own image, in every layout."""

import jax.numpy as jnp
import numpy as np
import pytest

from kosmos2_jax.models.kosmos2 import gather_image_embeds
from kosmos2_jax.train.image_slots import capacity, compact_images, image_counts


def test_capacity_rounds_up_to_quarters_of_the_slots():
    assert [capacity(n, 16) for n in (0, 1, 4, 5, 12, 13, 16)] == [4, 4, 4, 8, 12, 16, 16]
    assert [capacity(n, 6) for n in (0, 2, 3, 6)] == [2, 2, 4, 6]  # quarters of 6 rounded up: 2
    assert capacity(1, 1) == 1


@pytest.mark.parametrize("packed", [True, False])
def test_compacted_images_come_back_to_their_slots(packed):
    rng = np.random.default_rng(0)
    if packed:
        counts = np.array([2, 0, 2, 1, 0, 3])
        pixels = np.zeros((6, 3, 2, 2, 3), np.uint8)
        for r, n in enumerate(counts):
            pixels[r, :n] = rng.integers(1, 255, (n, 2, 2, 3))
    else:  # one slot per row; text-only rows hold zeros
        counts = np.array([1, 0, 1, 1, 0, 0])
        pixels = rng.integers(1, 255, (6, 2, 2, 3)).astype(np.uint8) * counts[:, None, None, None].astype(np.uint8)
    assert image_counts(pixels, counts).tolist() == counts.tolist()
    compact, index = compact_images(pixels, counts, groups=3, cap=3)
    assert compact.shape == (9, 2, 2, 3) and compact.dtype == np.uint8
    assert index.shape == (3, 2, 3 if packed else 1)
    # each real slot's image, read the way the model reads it: block of its group + index
    per_row = pixels if packed else pixels[:, None]
    for r, n in enumerate(counts):
        g = r // 2
        for k in range(n):
            np.testing.assert_array_equal(compact[g * 3 + index[g, r % 2, k]], per_row[r, k])
    assert sum(int(np.any(im)) for im in compact) == counts.sum()  # the rest is zero padding
    # the embeddings of the compact images land on each row's slots, in order
    feats = jnp.asarray(rng.standard_normal((9, 4, 5)), jnp.float32)  # [groups * cap, Q, D]
    rows = np.asarray(gather_image_embeds(feats, jnp.asarray(index)))
    assert rows.shape == (6, per_row.shape[1] * 4, 5)
    for r, n in enumerate(counts):
        for k in range(n):
            np.testing.assert_array_equal(rows[r, 4 * k:4 * (k + 1)], np.asarray(feats)[(r // 2) * 3 + index[r // 2, r % 2, k]])


def test_clear_errors():
    pixels = np.zeros((4, 2, 2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match="does not fit 4 rows of 2 image slots"):
        image_counts(pixels, np.array([1, 3, 0, 0]))
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        compact_images(pixels, np.array([1, 1, 0, 0]), groups=3, cap=2)
    with pytest.raises(ValueError, match="more than capacity 2"):
        compact_images(pixels, np.array([2, 1, 0, 0]), groups=2, cap=2)
