"""The LM loss: next-token cross-entropy through the tied LM head, with optional soft location targets.

`cross_entropy` is the plain one (the default, `train.loss_impl="plain"`): logits for every
position, jax.grad for the backward; change it freely. `chunked_lm_head_loss` is the same loss,
opt-in (`train.loss_impl="chunked"`) for the full-size configs, where [B, T, vocab] float32
logits do not fit (docs/DESIGN.md, the speed machinery table): the decoder's final states are
multiplied by the [vocab, embed] embedding chunk by chunk of positions, only for chunks that hold
a target (image slots and padding never are), with the gradient computed in the forward pass
(a `custom_vjp`: each chunk costs three matmuls and keeps no logits). Each row's target positions
are first moved to its front (a stable sort), so "skip the chunks with no target" works for
packed rows too. tests/test_loss.py holds the two equal in value and every gradient.

Soft location targets (`location_kernel`, `train.location_sigma` > 0): a location-token target
is a 2-D Gaussian over the grid around the true cell rather than one cell. The reported `nll`
and `correct` stay those of the true cell.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kosmos2_jax.utils.errors import UsageError


def location_kernel(side: int, sigma: float) -> np.ndarray:
    """[side*side, side*side] float32: row i is the soft target for location cell i (row-major over
    the grid, as the location tokens are), exp(-d^2 / (2 sigma^2)) over the cells' grid distance d,
    normalized to sum 1. `sigma` is in cells; as it goes to 0 the rows become one-hot."""
    if side < 1 or sigma <= 0:
        raise UsageError(f"location kernel needs side >= 1 and sigma > 0, got side={side}, sigma={sigma}")
    y, x = np.divmod(np.arange(side * side), side)
    d2 = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2
    k = np.exp(-(d2 - d2.min(axis=1, keepdims=True)) / (2.0 * float(sigma) ** 2))
    return (k / k.sum(axis=1, keepdims=True)).astype(np.float32)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, location_kernel=None,
                  first_location_id: int = 0):
    """Cross-entropy of `targets` [B, T] under `logits` [B, T, V], plain autodiff.

    -> (sum(weights * loss per target), nll [B, T], correct [B, T]): nll = logsumexp(logits) -
    logits[target]; correct = the target's logit is the maximum (a tie counts as correct).
    `location_kernel` [L, L] with `first_location_id`: a target in [first_location_id,
    first_location_id + L) is scored against the kernel row of its cell (soft cross-entropy
    logsumexp - sum(q * logits)) in the loss; nll and correct stay those of the true cell."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = lse - target_logit
    correct = jax.lax.stop_gradient((target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32))
    per_target = nll
    if location_kernel is not None:
        kernel = jnp.asarray(location_kernel, jnp.float32)
        n = kernel.shape[0]
        is_loc = (targets >= first_location_id) & (targets < first_location_id + n)
        q = kernel[jnp.clip(targets - first_location_id, 0, n - 1)]  # [B, T, L]
        soft_logit = jnp.sum(q * logits[..., first_location_id:first_location_id + n], axis=-1)
        per_target = jnp.where(is_loc, lse - soft_logit, nll)
    return jnp.sum(per_target * weights), nll, correct


def chunked_lm_head_loss(hidden: jax.Array, embedding: jax.Array, targets: jax.Array, weights: jax.Array,
                         active: jax.Array, chunk: int = 8, tail_chunk: int = 8, location_kernel=None,
                         first_location_id: int = 0):
    """Cross-entropy of `targets` under logits `hidden @ embedding.T`.

    hidden [B, T, D] (the decoder's final-LayerNormed states; their dtype is the compute dtype),
    embedding [V, D], targets [B, T] ints, weights [B, T] (the loss weight of each target), active
    [B, T] bools: the positions to compute (every position with a non-zero weight must be active).
    `chunk`: positions per row computed together; the last few targets of the longest row go in
    chunks of `tail_chunk` (at most `chunk`) whenever fewer than half a `chunk` of them are left, so
    small chunks pick up the remainder and large ones keep the matmuls efficient.

    `location_kernel` [L, L] (`location_kernel()`), with `first_location_id`: a target in
    [first_location_id, first_location_id + L) is scored against row `target - first_location_id`
    of the kernel as a soft target (cross-entropy logsumexp - sum(q * logits)) in the loss.

    Returns (sum(weights * loss per target), nll [B, T], correct [B, T]) where nll = logsumexp(logits)
    - logits[target] and correct = (logits[target] is the maximum logit), both 0 off `active`. Only
    the first output is differentiable (the other two are metrics).
    """
    b, t, d = hidden.shape
    order = jnp.argsort(~active, axis=1, stable=True)  # each row's active positions first
    take = lambda x: jnp.take_along_axis(x, order if x.ndim == 2 else order[..., None], axis=1)
    # padded by one chunk, so a chunk starting at any position < T fits
    padded = [jnp.pad(take(x), ((0, 0), (0, chunk)) + ((0, 0),) * (x.ndim - 2))
              for x in (hidden, targets, weights.astype(jnp.float32))]
    longest = jnp.max(jnp.sum(active, axis=1))  # the most targets in a row
    kernel = None if location_kernel is None else jnp.asarray(location_kernel, jnp.float32)
    loss, nll, correct = _chunked_loss(*padded, longest, embedding, kernel, first_location_id, chunk,
                                       min(tail_chunk, chunk))
    unsort = jnp.argsort(order, axis=1)
    back = lambda x: jnp.take_along_axis(x[:, :t], unsort, axis=1)
    return loss, back(nll) * active, back(correct) * active


def _chunk(h, targets, weights, embedding, soft, with_grad: bool):
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
    if soft is None:
        loss = jnp.sum(nll * w)
    else:  # location targets: cross-entropy against the kernel row of the true cell
        kernel, first = soft
        n_loc = kernel.shape[0]
        is_loc = (tgt >= first) & (tgt < first + n_loc)
        q = kernel[jnp.clip(tgt - first, 0, n_loc - 1)] * is_loc[:, None]  # [N, L], 0 on other targets
        soft_logit = jnp.sum(q * jax.lax.dynamic_slice_in_dim(logits, first, n_loc, axis=1), axis=-1)
        loss = jnp.sum((top + jnp.log(total) - jnp.where(is_loc, soft_logit, target_logit)) * w)
    grads = None
    if with_grad:  # d loss / d logits = w * (softmax - target distribution)
        dlogits = exp * (w / total)[:, None]
        if soft is None:
            dlogits = dlogits.at[jnp.arange(b * c), tgt].add(-w)
        else:
            dlogits = dlogits.at[jnp.arange(b * c), tgt].add(-w * ~is_loc)
            dlogits = jax.lax.dynamic_update_slice_in_dim(
                dlogits, jax.lax.dynamic_slice_in_dim(dlogits, first, n_loc, axis=1) - w[:, None] * q, first, axis=1)
        dlogits = dlogits.astype(h.dtype)
        d_h = jnp.dot(dlogits, emb, preferred_element_type=jnp.float32).astype(h.dtype).reshape(b, c, d)
        d_emb = jnp.dot(dlogits.T, rows, preferred_element_type=jnp.float32)
        grads = (d_h, d_emb)
    return loss, nll.reshape(b, c), correct.reshape(b, c), grads


def _loop_chunks(h, targets, weights, longest, embedding, soft, chunk: int, tail: int, with_grad: bool):
    """Chunk after chunk of positions while any row has targets left: rows hold their targets first,
    so the chunks with targets are a prefix and the loop stops after the longest row's last target.
    Each chunk is `chunk` positions wide while at least half a `chunk` of targets is left, else
    `tail`. The first chunk (`tail` wide) is computed before the loop: its gradient starts the
    accumulator (no zero-filled [vocab, embed] buffer; without targets its weights are all 0 and so
    are its contributions)."""
    put = lambda buf, x, s: jax.lax.dynamic_update_slice_in_dim(buf, x, s, axis=1)

    def step(state, width):
        s = state[0]
        at = lambda x: jax.lax.dynamic_slice_in_dim(x, s, width, axis=1)
        loss, nll_c, correct_c, grads = _chunk(at(h), at(targets), at(weights), embedding, soft, with_grad)
        out = (s + width, state[1] + loss, put(state[2], nll_c, s), put(state[3], correct_c, s))
        if with_grad:
            out += (put(state[4], grads[0], s), state[5] + grads[1])
        return out

    zeros = jnp.zeros(targets.shape, jnp.float32)
    loss, nll_c, correct_c, grads = _chunk(h[:, :tail], targets[:, :tail], weights[:, :tail], embedding, soft,
                                           with_grad)
    init = (jnp.int32(tail), loss, put(zeros, nll_c, 0), put(zeros, correct_c, 0))
    if with_grad:
        init += (put(jnp.zeros_like(h), grads[0], 0), grads[1])

    def body(state):
        if tail == chunk:
            return step(state, chunk)
        return jax.lax.cond(longest - state[0] >= chunk // 2, lambda st: step(st, chunk), lambda st: step(st, tail),
                            state)

    return jax.lax.while_loop(lambda state: state[0] < longest, body, init)[1:]


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _chunked_loss(h, targets, weights, longest, embedding, kernel, first, chunk, tail):
    soft = None if kernel is None else (kernel, first)
    return _loop_chunks(h, targets, weights, longest, embedding, soft, chunk, tail, with_grad=False)


def _fwd(h, targets, weights, longest, embedding, kernel, first, chunk, tail):
    soft = None if kernel is None else (kernel, first)
    loss, nll, correct, d_h, d_emb = _loop_chunks(h, targets, weights, longest, embedding, soft, chunk, tail,
                                                  with_grad=True)
    return (loss, nll, correct), (d_h, d_emb.astype(embedding.dtype), kernel)


def _bwd(first, chunk, tail, residuals, cotangents):
    d_h, d_emb, kernel = residuals
    g = cotangents[0]  # nll and correct are metrics: their cotangents are ignored
    no_grad = None if kernel is None else jnp.zeros_like(kernel)  # the kernel is a constant
    return (d_h * g.astype(d_h.dtype), None, None, None, d_emb * g.astype(d_emb.dtype), no_grad)


_chunked_loss.defvjp(_fwd, _bwd)
