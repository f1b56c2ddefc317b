"""The training loss: the chunked, targets-only LM head equals the plain full-logits cross-entropy,
and loss and gradients of `loss_and_metrics` equal HF PyTorch's on the same weights and batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kosmos2_jax.train.loss import lm_head_loss


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
    from kosmos2_jax import convert
    from kosmos2_jax.models import Kosmos2
    from kosmos2_jax.train.trainer import loss_and_metrics

    name, vision, text, queries = SMALL_CONFIGS[1]
    hf = hf_model(vision, text, queries)
    config = convert.config_from_hf(hf.config.to_dict())
    model, params = Kosmos2(config), convert.params_from_hf(hf.state_dict(), config)
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

    ours = convert.state_dict_from_params(jax.device_get(grads))
    theirs = {k: p.grad.numpy() for k, p in hf.named_parameters() if p.grad is not None}
    assert set(theirs) <= set(ours)
    for key, ref in theirs.items():
        scale = max(1e-3, float(np.abs(ref).max()))
        err = float(np.abs(ours[key] - ref).max())
        assert err <= 1e-4 * scale, f"{key}: gradient differs by {err:.3g} (scale {scale:.3g})"
