"""The training loss: the chunked, targets-only LM head equals the plain full-logits cross-entropy,
and loss and gradients of `loss_and_metrics` equal HF PyTorch's on the same weights and batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kosmos2_jax.train.loss import chunked_lm_head_loss as lm_head_loss, location_kernel


def _plain(hidden, embedding, targets, weights, active):
    logits = jnp.dot(hidden, embedding.T, preferred_element_type=jnp.float32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(nll * weights), (nll * active, correct * active)


def _inputs(dtype=np.float32):
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 37, 16, 50
    hidden = rng.normal(size=(b, t, d)).astype(dtype)
    embedding = rng.normal(size=(v, d)).astype(np.float32)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    active = np.zeros((b, t), bool)
    active[0, 20:] = True  # an image prefix, then text (unpacked rows)
    active[1] = rng.random(t) < 0.4  # scattered targets (packed rows)
    # row 2: no targets at all
    weights = np.where(active, rng.random((b, t)) + 0.5, 0.0).astype(np.float32)
    return [jnp.asarray(x) for x in (hidden, embedding, targets, weights, active)]


@pytest.mark.parametrize("chunk,tail", [(1, 8), (5, 8), (16, 8), (16, 3), (64, 8), (7, 2)])
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(chunk, tail):
    hidden, embedding, targets, weights, active = _inputs()
    (ref, (ref_nll, ref_correct)), ref_grads = jax.value_and_grad(
        lambda h, e: _plain(h, e, targets, weights, active), (0, 1), has_aux=True)(hidden, embedding)

    def ours(h, e):
        loss, nll, correct = lm_head_loss(h, e, targets, weights, active, chunk, tail)
        return loss, (nll, correct)

    (loss, (nll, correct)), grads = jax.jit(jax.value_and_grad(ours, (0, 1), has_aux=True))(hidden, embedding)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(nll, ref_nll, atol=1e-4)
    np.testing.assert_array_equal(correct, ref_correct)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5)
    # without differentiation: the same loss (the primal path computes no gradients)
    np.testing.assert_allclose(jax.jit(lambda h, e: ours(h, e)[0])(hidden, embedding), ref, rtol=1e-5)


def _plain_soft(hidden, embedding, targets, weights, kernel, first):
    """Dense cross-entropy against a target distribution: the kernel row on location targets."""
    logits = jnp.dot(hidden, embedding.T, preferred_element_type=jnp.float32)
    n = kernel.shape[0]
    is_loc = (targets >= first) & (targets < first + n)
    q = jnp.zeros(logits.shape).at[..., first:first + n].set(jnp.asarray(kernel)[jnp.clip(targets - first, 0, n - 1)])
    q = jnp.where(is_loc[..., None], q, jax.nn.one_hot(targets, logits.shape[-1]))
    return jnp.sum((jax.nn.logsumexp(logits, -1) - jnp.sum(q * logits, -1)) * weights)


def test_location_kernel_rows():
    k = location_kernel(4, 1.0)
    np.testing.assert_allclose(k.sum(axis=1), 1.0, rtol=1e-6)
    row = k[5].reshape(4, 4)  # cell (1, 1): the peak, symmetric in its four neighbours
    assert row.argmax() == 5 and row[0, 1] == row[1, 0] == row[1, 2] == row[2, 1] < row[1, 1]
    assert location_kernel(4, 0.05)[5, 5] > 0.999  # a narrow kernel is one-hot
    with pytest.raises(ValueError, match="sigma"):
        location_kernel(4, 0.0)


@pytest.mark.parametrize("chunk,tail", [(8, 8), (16, 3)])
def test_soft_location_targets_equal_dense_cross_entropy(chunk, tail):
    """Soft targets (train.location_sigma): loss and gradients equal autodiff through the dense
    cross-entropy against the kernel rows; the reported nll and accuracy stay the true cell's."""
    hidden, embedding, targets, weights, active = _inputs()
    kernel, first = location_kernel(4, 0.8), 30  # tokens 30..45 are a 4 x 4 grid
    ref, ref_grads = jax.value_and_grad(lambda h, e: _plain_soft(h, e, targets, weights, kernel, first),
                                        (0, 1))(hidden, embedding)
    ours = lambda h, e: lm_head_loss(h, e, targets, weights, active, chunk, tail, location_kernel=kernel,
                                     first_location_id=first)
    loss, grads = jax.jit(jax.value_and_grad(lambda h, e: ours(h, e)[0], (0, 1)))(hidden, embedding)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5)
    _, (plain_nll, plain_correct) = _plain(hidden, embedding, targets, weights, active)
    _, nll, correct = ours(hidden, embedding)
    np.testing.assert_allclose(nll, plain_nll, atol=1e-4)
    np.testing.assert_array_equal(correct, plain_correct)
    hard = lm_head_loss(hidden, embedding, targets, weights, active, chunk, tail)[0]
    assert abs(float(loss) - float(hard)) > 1.0  # the soft targets do change the loss


def test_chunked_loss_in_bfloat16_compute():
    hidden, embedding, targets, weights, active = _inputs()
    ref, _ = _plain(hidden, embedding, targets, weights, active)
    loss, _, _ = lm_head_loss(hidden.astype(jnp.bfloat16), embedding, targets, weights, active, 8)
    np.testing.assert_allclose(loss, ref, rtol=2e-2)
    grads = jax.grad(lambda h, e: lm_head_loss(h, e, targets, weights, active, 8)[0], (0, 1))(
        hidden.astype(jnp.bfloat16), embedding)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32


def test_loss_and_gradients_equal_hf_pytorch():
    """One training forward/backward: our loss and every parameter's gradient equal HF's (PyTorch
    autograd through Kosmos2ForConditionalGeneration + masked cross-entropy), dropout off."""
    torch = pytest.importorskip("torch")
    from hf_reference import SMALL_CONFIGS, grounded_batch, hf_model
    from kosmos2_jax import weights
    from kosmos2_jax.models import Kosmos2
    from conftest import loss_and_metrics

    name, vision, text, queries = SMALL_CONFIGS[1]
    hf = hf_model(vision, text, queries)
    config = weights.config_from_hf(hf.config.to_dict())
    model, params = Kosmos2(config), weights.params_from_hf(hf.state_dict(), config)
    rng = np.random.default_rng(0)
    pixels, ids, attn, img = grounded_batch(rng, 3, queries, text["vocab_size"], vision["image_size"],
                                            [queries + 12, queries + 7, queries + 10])
    loss_mask = attn.copy()
    loss_mask[:, :queries + 3] = 0  # <s> <image> slots </image>
    batch = {"pixel_values": pixels, "input_ids": ids.astype(np.int32), "attention_mask": attn.astype(np.int32),
             "image_embeds_position_mask": img.astype(np.int32), "loss_mask": loss_mask.astype(np.int32)}
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: loss_and_metrics(model, p, batch, jax.random.PRNGKey(0), True, 0, 1, loss_chunk=4),
        has_aux=True)(params)

    logits = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)), input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(attn), image_embeds_position_mask=torch.from_numpy(img)).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            torch.from_numpy(ids[:, 1:]).reshape(-1), reduction="none")
    hf_loss = (nll * torch.from_numpy(loss_mask[:, 1:].astype(np.float32)).reshape(-1)).sum()
    hf_loss.backward()
    np.testing.assert_allclose(float(loss), hf_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["nll_sum"]), hf_loss.item(), rtol=1e-5)

    ours = weights.state_dict_from_params(jax.device_get(grads))
    theirs = {k: p.grad.numpy() for k, p in hf.named_parameters() if p.grad is not None}
    assert set(theirs) <= set(ours)
    for key, ref in theirs.items():
        scale = max(1e-3, float(np.abs(ref).max()))
        err = float(np.abs(ours[key] - ref).max())
        assert err <= 1e-4 * scale, f"{key}: gradient differs by {err:.3g} (scale {scale:.3g})"
