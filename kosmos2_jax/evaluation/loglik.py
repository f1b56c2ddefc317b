"""Zero-shot multiple choice by log-likelihood (how KOSMOS-1/2 were scored on language tasks): the
model reads `context + candidate` and each candidate is scored by the summed log-probability of its
own tokens; the highest wins. Also the per-token mean ("acc_norm"-style) for reference."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from kosmos2_jax.utils.errors import UsageError


def candidate_logprobs(model, params, tokenizer, context: str, candidates: Sequence[str]) -> list[dict]:
    """Every candidate continuing one context; see `pair_logprobs`."""
    return pair_logprobs(model, params, tokenizer, [(context, c) for c in candidates])


def pair_logprobs(model, params, tokenizer, pairs: Sequence[tuple[str, str]]) -> list[dict]:
    """One forward pass over all (context, continuation) pairs (right-padded): [{sum, mean, tokens}]
    per pair. Token boundaries: the continuation's tokens are those of encode(context + continuation)
    after the prefix encode(context); `<s>` is prepended (text only, no image). Pairs with their own
    contexts score Winograd-style items (the option substituted, the rest of the sentence scored)."""
    rows, starts = [], []
    for context, cand in pairs:
        ctx = [tokenizer.bos_id] + tokenizer.encode(context)
        full = [tokenizer.bos_id] + tokenizer.encode(context + cand)
        start = len(ctx) if full[:len(ctx)] == ctx else _common_prefix(full, ctx)
        if start >= len(full):
            raise UsageError(f"candidate {cand!r} adds no tokens to the context")
        rows.append(full)
        starts.append(start)
    length = max(map(len, rows))
    ids = np.full((len(rows), length), tokenizer.pad_id, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    logits = np.asarray(_forward(model, params, ids, mask), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    out = []
    for i, (r, s) in enumerate(zip(rows, starts)):
        targets = np.asarray(r[s:])
        lp = logp[i, np.arange(s - 1, len(r) - 1), targets]
        out.append({"sum": float(lp.sum()), "mean": float(lp.mean()), "tokens": int(len(targets))})
    return out


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@functools.lru_cache(maxsize=8)
def _compiled_forward(model):
    # One jitted function per model: a fresh `jax.jit(lambda ...)` per call would retrace every item.
    return jax.jit(lambda p, i, m: model.apply({"params": p}, None, i, m, None))


def _forward(model, params, ids, mask):
    return _compiled_forward(model)(params, ids, mask)


def choose(scores: Sequence[dict], normalize: bool = False) -> int:
    key = "mean" if normalize else "sum"
    return int(np.argmax([s[key] for s in scores]))
