"""Generation: image features once, a compiled prefill into the KV cache, then decoding on device.

    out = generate(model, params, processor_outputs, max_new_tokens=64, no_repeat_ngram_size=3)
    out.sequences   # [B, prompt + new] ids (prompt as given, then the new tokens)
    out.scores      # [B, new] log-probabilities of the chosen tokens under the processed distribution

Greedy decoding, beam search and n-gram blocking reproduce Hugging Face `generate` (transformers
4.46.3) token for token: the same logits processing order (log-softmax, n-gram ban, beam scores),
HF's beam bookkeeping (2*beams candidates, finished hypotheses scored by length**length_penalty,
the `early_stopping=False` stopping rule, the same finalization), and positions counted over
non-pad tokens so that left-padded batches equal unpadded ones (reference §1.7).

Prompts are left-padded to a bucket length (a multiple of `bucket`), so a stream of prompts of
different lengths reuses a few compiled programs; the extra pads are invisible to the model and
to the n-gram rule.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kosmos2_jax.models import Kosmos2, init_cache, sharding
from kosmos2_jax.models.decoder import TextBlock, attention_bias, position_ids_from_input_ids
from kosmos2_jax.models.vision import VisionBlock
from kosmos2_jax.utils.errors import UsageError

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    sequences: np.ndarray  # [B, P + N]
    scores: np.ndarray  # [B, N] per-token log-probs (0 after the end)
    sequence_scores: np.ndarray | None = None  # beam search: the chosen hypothesis' length-normalized score


@dataclasses.dataclass(frozen=True)
class _Settings:
    max_new_tokens: int
    num_beams: int
    do_sample: bool
    temperature: float
    top_p: float
    no_repeat_ngram_size: int
    eos_token_id: int
    pad_token_id: int
    length_penalty: float
    decode_mode: str = "layerwise"  # resolved: "layerwise" or "fused" (DECODE_MODES)
    tokens_per_call: int = 32  # fused: decoding steps one dispatch runs at most


# --- logits processing ------------------------------------------------------------------------
def ban_repeated_ngrams(scores, tokens, cur_len, start, n: int):
    """HF NoRepeatNGramLogitsProcessor over `tokens[:, start:cur_len]` (each row's sequence so far):
    a token that would complete an n-gram already in the sequence gets -inf."""
    if n <= 0:
        return scores
    rows, total = tokens.shape
    seq_len = cur_len - start
    idx = jnp.arange(total)
    # prefix[b, j] = tokens[b, cur_len - n + 1 + j], j < n - 1: the last n-1 tokens
    prefix = jax.lax.dynamic_slice_in_dim(tokens, cur_len - (n - 1), n - 1, axis=1) if n > 1 else tokens[:, :0]
    match = jnp.ones((rows, total), bool)
    for j in range(n - 1):
        shifted = jnp.roll(tokens, -j, axis=1)  # shifted[:, i] = tokens[:, i + j]
        match &= shifted == prefix[:, j:j + 1]
    valid = (idx >= start) & (idx + n - 1 < cur_len)  # n-grams lying inside the sequence
    match &= valid[None, :] & (seq_len + 1 >= n)
    banned_tokens = jnp.roll(tokens, -(n - 1), axis=1)  # the n-gram's last token
    banned = jnp.zeros(scores.shape, bool)
    banned = banned.at[jnp.arange(rows)[:, None], jnp.where(match, banned_tokens, 0)].max(match)
    return jnp.where(banned, NEG_INF, scores)


def first_argmax(scores):
    """`jnp.argmax(scores, axis=-1)` (the first maximum) as two plain reductions, a max and a min over
    the indices holding it: XLA:CPU runs argmax as a (value, index) reduction that it does not
    vectorize, 5x slower over a 65k vocabulary at 8 rows (benchmarks: 1.30 against 0.26 ms).
    Indices as float32 are exact below 2**24."""
    top = jnp.max(scores, axis=-1, keepdims=True)
    index = jnp.arange(scores.shape[-1], dtype=jnp.float32)
    return jnp.min(jnp.where(scores == top, index, jnp.inf), axis=-1).astype(jnp.int32)


def top_p_filter(logits, top_p: float):
    """HF TopPLogitsWarper: drop the smallest tokens whose cumulative probability is <= 1 - top_p."""
    if top_p >= 1.0:
        return logits
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted = remove_sorted.at[:, -1].set(False)  # keep at least one
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, logits)


# --- the compiled programs ----------------------------------------------------------------------
# One decoding path, the model's own: image features, a prefill into the `cache` collection
# (`init_cache`, `Kosmos2.decode_step`), then one token at a time through the same method, on
# scanned or unrolled params. Two ways to drive it:
# - `fused` (GPUs and TPUs): a whole decoding step is one program, and one dispatch runs up to
#   `tokens_per_call` steps in a `lax.while_loop` (the cache donated), leaving early when every row
#   has ended. The host dispatches the next call before it reads the previous call's stop flag, so
#   it never waits inside the loop: one dispatch and at most one blocking read per K tokens. On a
#   GPU a released-size layer takes ~50 us, about one dispatch from Python: anything per layer
#   from the host would leave the device waiting.
# - `layerwise` (the CPU): the towers' blocks one compiled program each, called from Python on
#   every layer's weights (and KV cache), between the model's own first and last stages
#   (`Kosmos2.embed_pixels` ... `lm_logits`). XLA compiles one layer instead of the unrolled stacks,
#   which were most of a cold start on 2 cores, and a call costs tens of microseconds against the
#   ~11 ms a released-size layer takes to read its weights there.
DECODE_MODES = ("auto", "fused", "layerwise")
PROGRAMS = ("vision_embed", "vision_layer", "prefill", "prefill_layer", "prefill_logits", "choose", "layer", "logits")


def resolve_decode_mode(mode: str, platform: str | None = None) -> str:
    """`auto`: `layerwise` on the CPU (its per-layer programs compile fastest there and a dispatch
    costs little against a layer's work), `fused` on GPUs and TPUs."""
    if mode not in DECODE_MODES:
        raise UsageError(f"decode_mode {mode!r}: expected one of {', '.join(DECODE_MODES)}")
    if mode != "auto":
        return mode
    return "layerwise" if (platform or jax.default_backend()) == "cpu" else "fused"


def shard_params(model: Kosmos2, params, mesh: Mesh):
    """`params` placed on `mesh` under the training mesh's rules (`models/sharding.py`): the
    decoding programs then run sharded, e.g. `tensor=4` splits heads, MLP and vocabulary over 4 chips."""
    shardings = sharding.tree_shardings(sharding.logical_params(model), mesh)
    return jax.device_put(nn.unbox(params), shardings)


def _on_mesh(jitted, mesh: Mesh | None):
    """`jitted` called (and so traced) under `mesh` and the training rules, so that the model's
    activation constraints (`act_batch`, `act_heads`, ...) shard its activations as training does."""
    return jitted if mesh is None else _OnMesh(jitted, mesh)


@dataclasses.dataclass(frozen=True)
class _OnMesh:
    jitted: Any
    mesh: Mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh), sharding.logical_axis_rules():
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh), sharding.logical_axis_rules():
            return self.jitted.lower(*args)


def _step_positions(n_prompt, step):
    # fairseq positions: 1 + number of non-pad tokens up to and including this one
    return (1 + n_prompt + step)[:, None]


def _layers(model: Kosmos2, params, tower: str = "text") -> list:
    """(block params, index) of every layer of the decoder or the vision tower: its own subtree,
    or the scanned stack with the index the layer program takes its slice at."""
    c = model.config
    if tower == "text":
        stack, scanned, n = params["text_model"]["layers"], c.text_layers_scanned, c.text.layers
    else:
        stack, scanned, n = params["vision_model"]["encoder"], c.scan_layers, c.vision.num_hidden_layers
    return [(stack["layer"] if scanned else stack[f"layer_{i}"], np.int32(i)) for i in range(n)]


def _layer_slice(params, index, scanned: bool):
    params = nn.unbox(params)
    if not scanned:
        return params
    return jax.tree_util.tree_map(lambda p: jax.lax.dynamic_index_in_dim(p, index, keepdims=False), params)


def _cache_rows(cache, fn, scanned: bool):
    """`fn` applied along the rows (batch) axis of every key and value in a `cache` collection
    (axis 1 under scanned layers, whose caches are stacked), not to the write indices."""
    def on_rows(path, x):
        if getattr(path[-1], "key", None) not in ("cached_key", "cached_value"):
            return x
        return jnp.moveaxis(fn(jnp.moveaxis(x, 1, 0)), 0, 1) if scanned else fn(x)
    return jax.tree_util.tree_map_with_path(on_rows, cache)


def _repeat_rows(tree, k: int):
    return jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=0) if x.ndim else x, tree) if k > 1 else tree


def _start(s: _Settings, batch: int, prompt_len: int, prompt, prompt_mask, rng, pad_token_id: int) -> dict:
    """The decoding state after the prompt: ids and attention mask over the whole cache, the
    prompt's non-pad count, and the greedy or beam bookkeeping (beam search: the B rows repeated
    k times, as HF repeats the prompt)."""
    total = prompt_len + s.max_new_tokens
    mask = jnp.concatenate([prompt_mask, jnp.ones((batch, s.max_new_tokens), prompt_mask.dtype)], axis=1)
    tokens = jnp.concatenate([prompt, jnp.full((batch, s.max_new_tokens), s.pad_token_id, prompt.dtype)], axis=1)
    carry = dict(tokens=tokens, mask=mask, n_prompt=jnp.sum(prompt != pad_token_id, axis=1))
    k = s.num_beams
    return _repeat_rows(carry, k) | (_beam_start(s, batch, total) if k > 1 else _greedy_start(s, batch, rng))


def _choose(s: _Settings, prompt_len: int, batch: int, logits, carry, step, start):
    """The next tokens from `logits` -> (carry, the tokens, whether every row has ended, and for
    beam search which cache row each row continues (else None))."""
    if s.num_beams == 1:
        return _greedy_choose(s, prompt_len, logits, carry, step, start)
    return _beam_choose(s, prompt_len, batch, logits, carry, step, start)


@functools.lru_cache(maxsize=64)
def _compiled(model: Kosmos2, settings: _Settings, batch: int, prompt_len: int, with_image: bool) -> dict:
    """The per-layer mode's jitted programs (PROGRAMS), by name, that `_Program` drives."""
    s, cfg, k = settings, model.config, settings.num_beams
    pad = cfg.text.pad_token_id
    apply = lambda params, method, *args: model.apply({"params": params}, *args, method=method)  # noqa: E731

    def layer_cache():  # one decoder layer's empty cache, as `init_cache` makes it
        stack = init_cache(model, batch, prompt_len + s.max_new_tokens)["text_model"]["layers"]
        if cfg.text_layers_scanned:
            return jax.tree_util.tree_map(lambda c: c[0], stack["layer"])
        return stack["layer_0"]

    def block(params, index, cache, x, bias):
        out, state = TextBlock(cfg, decode=True).apply(
            {"params": _layer_slice(params, index, cfg.text_layers_scanned), "cache": cache}, x, bias, None, None,
            mutable=["cache"])
        return out, state["cache"]

    def vision_embed(params, pixel_values):  # [B, H, W, 3], or [B, N, H, W, 3] for N images a row
        return apply(params, Kosmos2.embed_pixels, pixel_values.reshape(-1, *pixel_values.shape[-3:]))

    def vision_layer(params, index, x):
        return VisionBlock(cfg).apply({"params": _layer_slice(params, index, cfg.scan_layers)}, x)

    def prefill(params, prompt, prompt_mask, image_mask, vision_tokens, rng):
        image_embeds = None
        if with_image:
            image_embeds = apply(params, Kosmos2.image_embeds_from_layers, vision_tokens)
            image_embeds = image_embeds.reshape(batch, -1, image_embeds.shape[-1])  # a row's images in order
        x = apply(params, Kosmos2.embed_text, prompt, position_ids_from_input_ids(prompt, pad), image_embeds,
                  image_mask if with_image else None)
        carry = _start(s, batch, prompt_len, prompt, prompt_mask, rng, pad)
        return x, attention_bias(carry["mask"][::k], prompt_len), carry

    def prefill_layer(params, index, x, bias):
        x, cache = block(params, index, layer_cache(), x, bias)
        return x, _repeat_rows(cache, k)

    def logits(params, x):
        return apply(params, Kosmos2.lm_logits, x[:, -1:])[:, 0].astype(jnp.float32)

    def prefill_logits(params, x):
        return jnp.repeat(logits(params, x), k, axis=0)

    def choose(params, logits, carry, step, start):
        """`_choose`, then the next tokens' embeddings and attention bias."""
        carry, nxt, ended, rows = _choose(s, prompt_len, batch, logits, carry, step, start)
        x = apply(params, Kosmos2.embed_text, nxt[:, None], _step_positions(carry["n_prompt"], step + 1))
        return carry, x, attention_bias(carry["mask"], 1, prompt_len + step), ended, rows

    def layer(params, index, cache, x, bias, rows):
        if rows is not None:
            cache = _cache_rows(cache, lambda c: jnp.take(c, rows, axis=0), scanned=False)
        return block(params, index, cache, x, bias)

    return dict(vision_embed=jax.jit(vision_embed), vision_layer=jax.jit(vision_layer),
                prefill=jax.jit(prefill), prefill_layer=jax.jit(prefill_layer),
                prefill_logits=jax.jit(prefill_logits), choose=jax.jit(choose),
                layer=jax.jit(layer, donate_argnums=2), logits=jax.jit(logits))


def _read(flag) -> bool:
    """A replicated scalar's value on this process (also for arrays spanning several processes)."""
    return bool(np.asarray(flag.addressable_data(0)))


@dataclasses.dataclass(frozen=True)
class _Program:
    """The per-layer mode's compiled programs (PROGRAMS), and the loop that drives them."""
    parts: dict
    max_new_tokens: int
    num_beams: int
    with_image: bool

    def __call__(self, model, params, prompt, prompt_mask, image_mask, pixel_values, start, rng):
        run = self.parts
        images = pixel_values  # text only: a placeholder the prefill does not read
        if self.with_image:
            images = run["vision_embed"](params, pixel_values)
            for block, index in _layers(model, params, "vision"):
                images = run["vision_layer"](block, index, images)
        layers = _layers(model, params)
        x, bias, carry = run["prefill"](params, prompt, prompt_mask, image_mask, images, rng)
        caches = []
        for block, index in layers:
            x, cache = run["prefill_layer"](block, index, x, bias)
            caches.append(cache)
        logits = run["prefill_logits"](params, x)
        for step in range(self.max_new_tokens):
            carry, x, bias, ended, rows = run["choose"](params, logits, carry, np.int32(step), start)
            if step + 1 == self.max_new_tokens or _read(ended):
                break
            for i, (block, index) in enumerate(layers):
                x, caches[i] = run["layer"](block, index, caches[i], x, bias, rows)
            logits = run["logits"](params, x)
        if self.num_beams == 1:
            return carry["tokens"], carry["scores"], step + 1
        return dict(carry, step=step + 1)


@functools.lru_cache(maxsize=64)
def _compiled_fused(model: Kosmos2, settings: _Settings, batch: int, prompt_len: int, with_image: bool,
                    mesh: Mesh | None = None) -> dict:
    """The accelerator mode's two jitted programs: `prefill_all` and `decode` (traced under `mesh`)."""
    s, cfg, k = settings, model.config, settings.num_beams
    pad = cfg.text.pad_token_id
    scanned = cfg.text_layers_scanned

    def prefill_all(params, prompt, prompt_mask, image_mask, pixel_values, rng):
        image_embeds = None
        if with_image:
            image_embeds = model.apply({"params": params}, pixel_values.reshape(-1, *pixel_values.shape[-3:]),
                                       method=Kosmos2.image_features)
            image_embeds = image_embeds.reshape(batch, -1, image_embeds.shape[-1])  # a row's images in order
        carry = _start(s, batch, prompt_len, prompt, prompt_mask, rng, pad)
        logits, state = model.apply(
            {"params": params, "cache": init_cache(model, batch, prompt_len + s.max_new_tokens)}, prompt,
            carry["mask"][::k], position_ids_from_input_ids(prompt, pad), image_embeds,
            image_mask if with_image else None, last_only=True, method=Kosmos2.decode_step, mutable=["cache"])
        cache = _cache_rows(state["cache"], lambda c: jnp.repeat(c, k, axis=0), scanned) if k > 1 else state["cache"]
        return carry, cache, jnp.repeat(logits[:, 0].astype(jnp.float32), k, axis=0)

    def decode(params, carry, cache, logits, step, start, ended):
        """Up to `tokens_per_call` steps from `step` (none once `ended`); -> (carry, cache, logits,
        step, ended)."""
        def body(state):
            i, step, carry, cache, logits, _ = state
            carry, nxt, ended, rows = _choose(s, prompt_len, batch, logits, carry, step, start)
            if rows is not None:
                cache = _cache_rows(cache, lambda c: jnp.take(c, rows, axis=0), scanned)
            logits, state = model.apply({"params": params, "cache": cache}, nxt[:, None], carry["mask"],
                                        _step_positions(carry["n_prompt"], step + 1), method=Kosmos2.decode_step,
                                        mutable=["cache"])
            ended = ended | (step + 1 >= s.max_new_tokens)
            return i + 1, step + 1, carry, state["cache"], logits[:, 0].astype(jnp.float32), ended

        def cond(state):
            i, _, _, _, _, ended = state
            return (i < s.tokens_per_call) & ~ended

        state = (jnp.int32(0), step, carry, cache, logits, ended)
        _, step, carry, cache, logits, ended = jax.lax.while_loop(cond, body, state)
        return carry, cache, logits, step, ended

    return dict(prefill_all=_on_mesh(jax.jit(prefill_all), mesh),
                decode=_on_mesh(jax.jit(decode, donate_argnums=(1, 2, 3)), mesh))


@dataclasses.dataclass(frozen=True)
class _FusedProgram:
    """The accelerator mode's compiled programs (`prefill_all`, `decode`) and the loop that drives them."""
    parts: dict
    max_new_tokens: int
    num_beams: int
    tokens_per_call: int

    def __call__(self, model, params, prompt, prompt_mask, image_mask, pixel_values, start, rng):
        carry, cache, logits = self.parts["prefill_all"](params, prompt, prompt_mask, image_mask, pixel_values, rng)
        step, ended, previous = jnp.int32(0), jnp.asarray(False), None
        for call in range(-(-self.max_new_tokens // self.tokens_per_call)):
            carry, cache, logits, step, ended = self.parts["decode"](params, carry, cache, logits, step, start, ended)
            # the previous call's flag: that call has finished by now, the host does not wait on this one
            if previous is not None and _read(previous):
                break
            previous = ended
        steps = int(np.asarray(step.addressable_data(0)))
        if self.num_beams == 1:
            return carry["tokens"], carry["scores"], steps
        return dict(carry, step=steps)


def _greedy_start(s: _Settings, rows: int, rng) -> dict:
    return dict(finished=jnp.zeros(rows, bool), scores=jnp.zeros((rows, s.max_new_tokens), jnp.float32), rng=rng)


def _greedy_choose(s: _Settings, prompt_len: int, logits, carry, step, start):
    """HF's greedy and sampling steps: the logits processors on the raw logits, then the argmax or
    a draw; the chosen token's log-probability under the processed distribution."""
    tokens, finished, rng = carry["tokens"], carry["finished"], carry["rng"]
    cur = prompt_len + step
    scores = ban_repeated_ngrams(logits, tokens, cur, start, s.no_repeat_ngram_size)
    if s.do_sample:
        scores = top_p_filter(scores / s.temperature, s.top_p)
        rng, sub = jax.random.split(rng)
        nxt = jax.random.categorical(sub, scores, axis=-1)
    else:
        nxt = first_argmax(scores)
    chosen = jnp.take_along_axis(scores, nxt[:, None], axis=1)[:, 0]
    logp = chosen - jax.nn.logsumexp(scores, axis=-1)
    nxt = jnp.where(finished, s.pad_token_id, nxt.astype(tokens.dtype))
    carry = dict(carry, rng=rng, scores=carry["scores"].at[:, step].set(jnp.where(finished, 0.0, logp)),
                 tokens=jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], cur, axis=1),
                 finished=finished | (nxt == s.eos_token_id))
    return carry, nxt, jnp.all(carry["finished"]), None


def _beam_start(s: _Settings, batch: int, total: int) -> dict:
    k = s.num_beams
    return dict(beam_scores=jnp.tile(jnp.array([0.0] + [-1e9] * (k - 1), jnp.float32), batch),  # [B*k]
                tok_logp=jnp.zeros((batch * k, s.max_new_tokens), jnp.float32),
                hyp_tokens=jnp.full((batch, k, total), s.pad_token_id, jnp.int32),
                hyp_logp=jnp.zeros((batch, k, s.max_new_tokens), jnp.float32),
                hyp_scores=jnp.full((batch, k), NEG_INF), hyp_len=jnp.zeros((batch, k), jnp.int32),
                hyp_count=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool))


def _beam_choose(s: _Settings, prompt_len: int, batch: int, logits, carry, step, start):
    k, vocab = s.num_beams, logits.shape[-1]
    tokens, beam_scores, tok_logp, done = carry["tokens"], carry["beam_scores"], carry["tok_logp"], carry["done"]
    hyp_tokens, hyp_logp, hyp_scores = carry["hyp_tokens"], carry["hyp_logp"], carry["hyp_scores"]
    hyp_len, hyp_count = carry["hyp_len"], carry["hyp_count"]
    cur = prompt_len + step  # tokens so far; HF's cur_len in process() is cur + 1
    processed = ban_repeated_ngrams(jax.nn.log_softmax(logits, axis=-1), tokens, cur, start, s.no_repeat_ngram_size)
    total_scores = (processed + beam_scores[:, None]).reshape(batch, k * vocab)
    cand_scores, cand = jax.lax.top_k(total_scores, 2 * k)
    cand_beam, cand_tok = cand // vocab, cand % vocab
    rows = jnp.arange(batch)[:, None] * k + cand_beam  # [B, 2k] global rows
    cand_logp = jnp.take_along_axis(processed.reshape(batch, k, vocab)[jnp.arange(batch)[:, None], cand_beam],
                                    cand_tok[..., None], axis=-1)[..., 0]
    is_eos = cand_tok == s.eos_token_id
    rank = jnp.arange(2 * k)[None, :]
    gen_len = (step + 1).astype(jnp.float32)

    # finished hypotheses: eos among the top k candidates, scored by length ** length_penalty
    new_hyp = is_eos & (rank < k) & ~done[:, None]
    new_scores = jnp.where(new_hyp, cand_scores / gen_len ** s.length_penalty, NEG_INF)
    new_tokens = tokens[rows]  # without the eos, as HF stores them
    new_logp = tok_logp[rows].at[:, :, step].set(cand_logp)
    pool_scores = jnp.concatenate([hyp_scores, new_scores], axis=1)
    keep = jnp.argsort(-pool_scores, axis=1, stable=True)[:, :k]
    pool_tokens = jnp.concatenate([hyp_tokens, new_tokens], axis=1)
    pool_logp = jnp.concatenate([hyp_logp, new_logp], axis=1)
    pool_len = jnp.concatenate([hyp_len, jnp.broadcast_to(step, new_scores.shape).astype(jnp.int32)], axis=1)
    take = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), axis=1)
    hyp_scores, hyp_tokens, hyp_logp, hyp_len = take(pool_scores), take(pool_tokens), take(pool_logp), take(pool_len)
    hyp_count = jnp.minimum(hyp_count + jnp.sum(new_hyp, axis=1), k)

    # next beams: the first k non-eos candidates in rank order
    order = jnp.argsort(jnp.where(is_eos, 2 * k + rank, rank), axis=1)[:, :k]
    next_rows = jnp.take_along_axis(rows, order, axis=1).reshape(-1)
    next_tok = jnp.take_along_axis(cand_tok, order, axis=1).reshape(-1)
    next_scores = jnp.take_along_axis(cand_scores, order, axis=1).reshape(-1)
    next_logp = jnp.take_along_axis(cand_logp, order, axis=1).reshape(-1)
    done_rows = jnp.repeat(done, k)
    next_rows = jnp.where(done_rows, jnp.arange(batch * k), next_rows)
    next_tok = jnp.where(done_rows, s.pad_token_id, next_tok).astype(tokens.dtype)
    next_scores = jnp.where(done_rows, 0.0, next_scores)

    worst = jnp.min(jnp.where(jnp.arange(k)[None] < hyp_count[:, None], hyp_scores, jnp.inf), axis=1)
    best_possible = jnp.max(cand_scores, axis=1) / gen_len ** s.length_penalty
    done = done | ((hyp_count >= k) & (worst >= best_possible))

    carry = dict(carry, tokens=jax.lax.dynamic_update_slice_in_dim(tokens[next_rows], next_tok[:, None], cur, axis=1),
                 tok_logp=tok_logp[next_rows].at[:, step].set(next_logp), beam_scores=next_scores,
                 hyp_tokens=hyp_tokens, hyp_logp=hyp_logp, hyp_scores=hyp_scores, hyp_len=hyp_len,
                 hyp_count=hyp_count, done=done)
    return carry, next_tok, jnp.all(done), next_rows


def _finalize_beams(out, s: _Settings, batch: int, prompt_len: int):
    """HF BeamSearchScorer.finalize on host: unfinished batches add their live beams; the best
    hypothesis is returned, followed by `</s>` when it ended early."""
    k = s.num_beams
    steps = int(out["step"])
    tokens = np.asarray(out["tokens"]).reshape(batch, k, -1)
    beam_scores = np.asarray(out["beam_scores"]).reshape(batch, k)
    tok_logp = np.asarray(out["tok_logp"]).reshape(batch, k, -1)
    best_tokens, best_logp, best_scores, lengths = [], [], [], []
    for b in range(batch):
        hyps = [(float(sc), np.asarray(out["hyp_tokens"][b, j]), np.asarray(out["hyp_logp"][b, j]),
                 int(out["hyp_len"][b, j]))
                for j, sc in enumerate(np.asarray(out["hyp_scores"][b])) if j < int(out["hyp_count"][b])]
        if not bool(out["done"][b]):
            for j in range(k):
                score = float(beam_scores[b, j]) / steps ** s.length_penalty
                hyps.append((score, tokens[b, j], tok_logp[b, j], steps))
        hyps.sort(key=lambda h: h[0])  # stable; HF pops the last
        score, toks, logp, n = hyps[-1]
        best_tokens.append(toks[:prompt_len + n])
        best_logp.append(logp[:n + 1] if n < steps else logp[:n])
        best_scores.append(score)
        lengths.append(n)
    width = min(max(lengths) + 1, s.max_new_tokens)
    seqs = np.full((batch, prompt_len + width), s.pad_token_id, np.int64)
    scores = np.zeros((batch, width), np.float32)
    for b in range(batch):
        n = lengths[b]
        seqs[b, :prompt_len + n] = best_tokens[b]
        if n < width:
            seqs[b, prompt_len + n] = s.eos_token_id
        m = min(len(best_logp[b]), width)
        scores[b, :m] = best_logp[b][:m]
    return seqs, scores, np.asarray(best_scores, np.float32)


# --- public API -------------------------------------------------------------------------------
def bucket_length(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def _signature(tree) -> tuple:
    """Hashable shapes, dtypes and shardings of a tree of arrays (or ShapeDtypeStructs)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(x.shape), np.dtype(x.dtype), getattr(x, "sharding", None)) for x in leaves)


@functools.lru_cache(maxsize=64)
def _executable(model: Kosmos2, settings: _Settings, batch: int, prompt_len: int, with_image: bool,
                pixels_shape: tuple, rng_spec: tuple, params_signature: tuple, mesh: Mesh | None = None):
    """The compiled generation program for these shapes: traced, then compiled or taken from JAX's
    persistent compilation cache (`cli.use_compilation_cache`). On a `mesh` the accelerator mode's
    jitted programs, compiled at their first call for the shardings XLA gives the KV cache and the
    decoding state."""
    if mesh is not None:
        return _FusedProgram(_compiled_fused(model, settings, batch, prompt_len, with_image, mesh),
                             settings.max_new_tokens, settings.num_beams, settings.tokens_per_call)
    params = _abstract(params_signature)
    if settings.decode_mode == "fused":
        parts = compile_fused(model, settings, batch, prompt_len, with_image, params, pixels_shape, rng_spec)
        return _FusedProgram(dict(zip(("prefill_all", "decode"), parts)), settings.max_new_tokens,
                             settings.num_beams, settings.tokens_per_call)
    functions = _compiled(model, settings, batch, prompt_len, with_image)
    ids, index = jax.ShapeDtypeStruct((batch, prompt_len), np.int32), jax.ShapeDtypeStruct((), np.int32)
    block = _layers(model, params)[0][0]
    with ThreadPoolExecutor(2) as pool:  # XLA compiles without the GIL: each program while the next is traced
        compiling = {}

        def lower(name, *args):
            lowered = functions[name].lower(*args)
            compiling[name] = pool.submit(lowered.compile)
            return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lowered.out_info)

        images = jax.ShapeDtypeStruct(pixels_shape, np.float32)
        if with_image:
            images = lower("vision_embed", params, images)
            lower("vision_layer", _layers(model, params, "vision")[0][0], index, images)
        x, bias, carry = lower("prefill", params, ids, ids, ids, images, jax.ShapeDtypeStruct(*rng_spec))
        x, cache = lower("prefill_layer", block, index, x, bias)
        logits = lower("prefill_logits", params, x)
        _, x, bias, _, rows = lower("choose", params, logits, carry, index, index)
        lower("layer", block, index, cache, x, bias, rows)
        lower("logits", params, x)
        return _Program({name: job.result() for name, job in compiling.items()}, settings.max_new_tokens,
                        settings.num_beams, with_image)


def compile_fused(model, settings, batch, prompt_len, with_image, params, pixels_shape, rng_spec, sharding=None,
                  mesh: Mesh | None = None):
    """The accelerator mode's two programs compiled ahead for these shapes -> (prefill_all, decode);
    `params` are ShapeDtypeStructs, `sharding` places every other argument (None: the default).
    On a `mesh` the decoding program takes the KV cache and state as the compiled prefill shards them."""
    spec = lambda shape, dtype, place=sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=place)  # noqa: E731
    functions = _compiled_fused(model, settings, batch, prompt_len, with_image, mesh)
    ids, index = spec((batch, prompt_len), np.int32), spec((), np.int32)
    lowered = functions["prefill_all"].lower(params, ids, ids, ids, spec(pixels_shape, np.float32), spec(*rng_spec))
    decode = lambda carry, cache, logits: functions["decode"].lower(  # noqa: E731
        params, carry, cache, logits, index, index, spec((), bool)).compile()
    if mesh is not None:
        prefill = lowered.compile()
        return prefill, decode(*prefill.out_info)
    with ThreadPoolExecutor(2) as pool:  # one device: XLA compiles the two side by side, without the GIL
        prefill = pool.submit(lowered.compile)
        return prefill.result(), decode(*jax.tree_util.tree_map(lambda x: spec(x.shape, x.dtype), lowered.out_info))


def _abstract(params_signature) -> Any:
    """`_signature`'s shapes, dtypes and shardings back as a tree of ShapeDtypeStructs."""
    treedef, specs = params_signature
    return jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(shape, dtype, sharding=place)
                                                  for shape, dtype, place in specs])


def check_inputs_fit(config, ids: np.ndarray, inputs: Mapping[str, np.ndarray]) -> None:
    """A UsageError when the processor that made `inputs` was not built for this model (its image
    size, image-token count, or a vocabulary the ids overflow): `format.processor.processor_for`."""
    hint = "build the processor from the model: processor_for(spm_path, model)"
    if inputs.get("pixel_values") is not None:
        side = np.shape(inputs["pixel_values"])[-2]  # [B, H, W, 3], or [B, N, H, W, 3] interleaved
        if side != config.vision.image_size:
            raise UsageError(f"the images are {side} px, the model's vision tower takes {config.vision.image_size} px: {hint}")
        pixels = np.shape(inputs["pixel_values"])
        most = config.latent_query_num * (pixels[1] if len(pixels) == 5 else 1)  # interleaved: N images a row
        slots = np.sum(np.asarray(inputs["image_embeds_position_mask"]), axis=1)
        if np.any(slots % config.latent_query_num) or np.any(slots > most):
            raise UsageError(f"the prompts hold {int(slots.max())} image tokens, the model makes "
                             f"{config.latent_query_num}: {hint}")
    if ids.size and int(ids.max()) >= config.text.vocab_size:
        raise UsageError(f"token id {int(ids.max())} is outside the model's vocabulary of {config.text.vocab_size}: {hint}")


def _program(model, params, inputs, max_new_tokens, num_beams, do_sample, temperature, top_p, no_repeat_ngram_size,
             eos_token_id, pad_token_id, length_penalty, rng, bucket, decode_mode, tokens_per_call, mesh):
    """Checks the request; returns (compiled program, its arguments but the params, settings, extra pads)."""
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1 or (num_beams > 1 and do_sample):
        raise UsageError(f"num_beams={num_beams} with do_sample={do_sample} is not supported")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise UsageError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    if do_sample and rng is None:
        raise UsageError("do_sample=True needs an rng (jax.random.PRNGKey)")
    ids = np.asarray(inputs["input_ids"], np.int32)
    mask = np.asarray(inputs.get("attention_mask", (ids != pad_token_id).astype(np.int32)), np.int32)
    batch, length = ids.shape
    if np.any(mask[:, -1] == 0) and batch > 1:
        raise UsageError("prompts must be left-padded for generation (processor(..., padding_side='left'))")
    longest = int(np.max(np.sum(ids != pad_token_id, axis=1)))
    limit = model.config.text.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise UsageError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"{limit} positions")
    with_image = inputs.get("pixel_values") is not None
    check_inputs_fit(model.config, ids, inputs)
    padded = bucket_length(length, bucket)
    extra = padded - length
    prompt = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_token_id)
    prompt_mask = np.pad(mask, ((0, 0), (extra, 0)))
    image_mask = np.pad(np.asarray(inputs.get("image_embeds_position_mask", np.zeros_like(ids)), np.int32),
                        ((0, 0), (extra, 0)))
    pixels = np.asarray(inputs["pixel_values"], np.float32) if with_image else np.zeros((batch, 1, 1, 3), np.float32)
    if tokens_per_call < 1:
        raise UsageError(f"tokens_per_call must be >= 1, got {tokens_per_call}")
    mode = resolve_decode_mode(decode_mode)
    if mesh is not None:  # several chips: GPUs and TPUs, where a dispatch per layer costs as much as the layer
        if decode_mode == "layerwise":
            raise UsageError("decode_mode 'layerwise' runs on one device; a mesh decodes with 'fused' (or 'auto')")
        mode = "fused"
    settings = _Settings(max_new_tokens, num_beams, do_sample, float(temperature), float(top_p),
                         no_repeat_ngram_size, eos_token_id, pad_token_id, float(length_penalty), mode,
                         int(tokens_per_call) if mode == "fused" else 32)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    run = _executable(model, settings, batch, padded, with_image, pixels.shape, (tuple(rng.shape), rng.dtype),
                      _signature(params), mesh)
    return run, (prompt, prompt_mask, image_mask, pixels, np.int32(extra), rng), settings, extra


def prepare(model: Kosmos2, params: Any, inputs: Mapping[str, np.ndarray], **options) -> None:
    """Compile (or fetch from the compilation cache) what `generate(model, params, inputs,
    **options)` will run. `params` may be ShapeDtypeStructs with the shardings the real ones will
    have, so that a caller can compile while it still loads the weights."""
    call = inspect.signature(generate).bind(model, params, inputs, **options)
    call.apply_defaults()
    _program(**call.arguments)


def generate(model: Kosmos2, params: Any, inputs: Mapping[str, np.ndarray], *, max_new_tokens: int,
             num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             no_repeat_ngram_size: int = 0, eos_token_id: int = 2, pad_token_id: int = 1,
             length_penalty: float = 1.0, rng: jax.Array | None = None, bucket: int = 32,
             decode_mode: str = "auto", tokens_per_call: int = 32, mesh: Mesh | None = None) -> GenerateOutput:
    """Continue each prompt of `inputs` (the processor's output; left padding for batches of
    different lengths, as HF requires) by up to `max_new_tokens` tokens. `decode_mode`: `fused`
    (a decoding step in one program, `tokens_per_call` steps per dispatch), `layerwise` (a program
    per layer, driven from Python) or `auto` (layerwise on the CPU, fused elsewhere). `mesh`: decode
    sharded over its devices (fused), `params` placed by `shard_params(model, params, mesh)`."""
    run, args, settings, extra = _program(model, params, inputs, max_new_tokens, num_beams, do_sample, temperature,
                                          top_p, no_repeat_ngram_size, eos_token_id, pad_token_id, length_penalty,
                                          rng, bucket, decode_mode, tokens_per_call, mesh)
    batch, padded = args[0].shape
    out = run(model, params, *args)
    if num_beams == 1:
        tokens, scores, steps = out
        steps = int(steps)
        return GenerateOutput(np.asarray(tokens)[:, extra:padded + steps], np.asarray(scores)[:, :steps])
    seqs, scores, seq_scores = _finalize_beams(out, settings, batch, padded)
    return GenerateOutput(seqs[:, extra:], scores, seq_scores)
