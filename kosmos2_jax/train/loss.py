"""Next-token cross-entropy through the tied LM head, only where there are targets, in chunks.

The decoder's final states are multiplied by the [vocab, embed] token embedding chunk by chunk of
positions, and only for chunks that hold a target: in KOSMOS-2 batches the 64 image slots of every
image (and padding) are never targets, so a plain head spends about half its work, in the largest
matmul of the model, on logits nobody reads. The [B, T, vocab] logits are never materialized either
(at 2048 tokens x 65,037 entries per row they would not fit on an accelerator).

Each row's target positions are first moved to its front (a stable sort), so "skip the chunks with no
target" works for packed rows too. The gradient is computed in the forward pass (the loss is a plain
weighted sum, so its cotangent is one scalar): each computed chunk costs three matmuls (logits,
d hidden, d embedding) and no logits are kept for the backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lm_head_loss(hidden: jax.Array, embedding: jax.Array, targets: jax.Array, weights: jax.Array,
                 active: jax.Array, chunk: int = 8):
    """Cross-entropy of `targets` under logits `hidden @ embedding.T`.

    hidden [B, T, D] (the decoder's final-LayerNormed states; their dtype is the compute dtype),
    embedding [V, D], targets [B, T] ints, weights [B, T] (the loss weight of each target), active
    [B, T] bools: the positions to compute (every position with a non-zero weight must be active).
    `chunk`: positions per row computed together.

    Returns (sum(weights * nll), nll [B, T], correct [B, T]) where nll = logsumexp(logits) -
    logits[target] and correct = (logits[target] is the maximum logit), both 0 off `active`. Only
    the first output is differentiable (the other two are metrics).
    """
    b, t, d = hidden.shape
    order = jnp.argsort(~active, axis=1, stable=True)  # each row's active positions first
    take = lambda x: jnp.take_along_axis(x, order if x.ndim == 2 else order[..., None], axis=1)
    pad = -t % chunk
    padded = [jnp.pad(take(x), ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
              for x in (hidden, targets, weights.astype(jnp.float32), active)]
    n = (t + pad) // chunk
    # [n, B, chunk, ...]: chunk j holds positions j*chunk .. of every row
    xs = tuple(x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1) for x in padded)
    loss, nll, correct = _chunked_loss(*xs, embedding)
    unsort = jnp.argsort(order, axis=1)
    back = lambda x: jnp.take_along_axis(x.swapaxes(0, 1).reshape(b, t + pad)[:, :t], unsort, axis=1)
    return loss, back(nll) * active, back(correct) * active


def _chunk(h, targets, weights, embedding, with_grad: bool):
    """One chunk: h [B, c, D] -> (weighted loss, nll [B, c], correct [B, c], grads or None)."""
    b, c, d = h.shape
    emb = embedding.astype(h.dtype)
    rows, tgt, w = h.reshape(b * c, d), targets.reshape(-1), weights.reshape(-1)
    logits = jnp.dot(rows, emb.T, preferred_element_type=jnp.float32)
    top = jnp.max(logits, axis=-1)
    exp = jnp.exp(logits - top[:, None])
    total = jnp.sum(exp, axis=-1)
    target_logit = jnp.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0]
    nll = top + jnp.log(total) - target_logit
    # the target is the argmax (a tie with another maximum counts as correct)
    correct = (target_logit >= top).astype(jnp.float32)
    loss = jnp.sum(nll * w)
    grads = None
    if with_grad:  # d loss / d logits = w * (softmax - onehot(target))
        dlogits = (exp * (w / total)[:, None]).at[jnp.arange(b * c), tgt].add(-w).astype(h.dtype)
        d_h = jnp.dot(dlogits, emb, preferred_element_type=jnp.float32).astype(h.dtype).reshape(b, c, d)
        d_emb = jnp.dot(dlogits.T, rows, preferred_element_type=jnp.float32)
        grads = (d_h, d_emb)
    return loss, nll.reshape(b, c), correct.reshape(b, c), grads


def _loop_chunks(h, targets, weights, active, embedding, with_grad: bool):
    """Chunk after chunk while any row has targets left: rows hold their targets first, so the
    chunks with targets are a prefix and the loop stops at the first chunk without one. The first
    chunk is computed before the loop (its gradient starts the accumulator: no zero-filled
    [vocab, embed] buffer; without targets its weights are all 0 and so are its contributions)."""
    n_active = jnp.sum(jnp.any(active, axis=(1, 2)))
    put = lambda buf, x, j: jax.lax.dynamic_update_index_in_dim(buf, x, j, 0)
    zeros = jnp.zeros(targets.shape, jnp.float32)
    loss, nll_c, correct_c, grads = _chunk(h[0], targets[0], weights[0], embedding, with_grad)
    init = (jnp.int32(1), loss, put(zeros, nll_c, 0), put(zeros, correct_c, 0))
    if with_grad:
        init += (put(jnp.zeros_like(h), grads[0], 0), grads[1])

    def body(state):
        j, loss_sum, nll, correct = state[:4]
        at = lambda x: jax.lax.dynamic_index_in_dim(x, j, keepdims=False)
        loss, nll_c, correct_c, grads = _chunk(at(h), at(targets), at(weights), embedding, with_grad)
        out = (j + 1, loss_sum + loss, put(nll, nll_c, j), put(correct, correct_c, j))
        if with_grad:
            out += (put(state[4], grads[0], j), state[5] + grads[1])
        return out

    return jax.lax.while_loop(lambda state: state[0] < n_active, body, init)[1:]


@jax.custom_vjp
def _chunked_loss(h, targets, weights, active, embedding):
    return _loop_chunks(h, targets, weights, active, embedding, with_grad=False)


def _fwd(h, targets, weights, active, embedding):
    loss, nll, correct, d_h, d_emb = _loop_chunks(h, targets, weights, active, embedding, with_grad=True)
    return (loss, nll, correct), (d_h, d_emb.astype(embedding.dtype))


def _bwd(residuals, cotangents):
    d_h, d_emb = residuals
    g = cotangents[0]  # nll and correct are metrics: their cotangents are ignored
    return (d_h * g.astype(d_h.dtype), None, None, None, d_emb * g.astype(d_emb.dtype))


_chunked_loss.defvjp(_fwd, _bwd)
