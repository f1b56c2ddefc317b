"""`attention_impl`: the `jax.nn.dot_product_attention` paths ("xla" here; "cudnn" shares every
line but the implementation name and needs a GPU) and Pallas splash attention (interpreted on CPU)
give the einsum path's logits and gradients on packed rows with padding, on right-padded unpacked
rows, with images and a causal decoder — from a causal flag and segment ids or lengths, no bias."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kosmos2_jax.models import Kosmos2, tiny
from kosmos2_jax.models.config import ATTENTION_IMPLS


def _packed_batch(rng, cfg, seq_len=40):
    """Two rows: [image example | text example | padding] and [text example | image example]."""
    n_img = cfg.latent_query_num
    ids = rng.integers(4, cfg.text.vocab_size, size=(2, seq_len)).astype(np.int32)
    img = np.zeros((2, seq_len), np.int32)
    seg = np.zeros((2, seq_len), np.int32)
    seg[0, :20], seg[0, 20:33] = 1, 2  # 7 pad positions
    seg[1, :12], seg[1, 12:] = 1, 2
    img[0, 2:2 + n_img] = 1
    img[1, 14:14 + n_img] = 1
    ids[seg == 0] = cfg.text.pad_token_id
    pixels = rng.standard_normal((2, 2, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return pixels, ids, (seg > 0).astype(np.int32), img, seg


def _loss_and_grads(impl):
    model = Kosmos2(tiny(vocab_size=97, attention_impl=impl))

    def loss(p, batch):
        pixels, ids, attn, img, seg = batch
        logits = model.apply({"params": p}, pixels, ids, attn, img, segment_ids=seg)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return (nll * attn[:, 1:]).sum(), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _assert_close(got, ref, real):
    (value, logits), grads = got
    (ref_value, ref_logits), ref_grads = ref
    # padding queries: their rows differ by design (they see no key under the einsum bias)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref_logits)[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)
    for (path, g), r in zip(flat, ref_flat):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_fused_attention_matches_einsum_on_packed_rows(impl):
    cfg = tiny(vocab_size=97)
    batch = _packed_batch(np.random.default_rng(0), cfg)
    pixels, ids, attn, img, seg = batch
    params = Kosmos2(cfg).init(jax.random.PRNGKey(0), pixels, ids, attn, img)["params"]
    fused = _loss_and_grads(impl)
    got = fused(params, batch)
    _assert_close(got, _loss_and_grads("einsum")(params, batch), attn.astype(bool))
    # the comparison can fail: without the segment mask the second example of each row changes
    (_, leaked), _ = fused(params, (pixels, ids, attn, img, (seg > 0).astype(np.int32)))
    assert np.abs(np.asarray(leaked) - np.asarray(got[0][1]))[seg == 2].max() > 1e-3


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_fused_attention_matches_einsum_on_right_padded_rows(impl):
    """Unpacked rows: the kernels get each row's length (and the causal flag), not a mask."""
    cfg = tiny(vocab_size=97)
    pixels, ids, _, img, seg = _packed_batch(np.random.default_rng(1), cfg)
    attn = np.ones_like(ids)
    attn[0, 29:], attn[1, 35:] = 0, 0
    ids = np.where(attn == 1, ids, cfg.text.pad_token_id)
    batch = (pixels[:, 0], ids, attn, img * attn, None)
    params = Kosmos2(cfg).init(jax.random.PRNGKey(0), pixels[:, 0], ids, attn, img)["params"]
    _assert_close(_loss_and_grads(impl)(params, batch), _loss_and_grads("einsum")(params, batch), attn.astype(bool))


def test_decoding_keeps_the_einsum_path():
    """A cached step (decode=True) computes the same with every attention_impl."""
    from kosmos2_jax.models.decoder import attention_bias
    from kosmos2_jax.models.layers import Attention

    x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 16))
    seen = np.ones((1, 5), np.int32)
    outs = {}
    for impl in ("einsum", "xla", "splash"):
        layer = Attention(num_heads=2, impl=impl)
        variables = layer.init(jax.random.PRNGKey(1), x, decode=True)
        _, cache = layer.apply(variables, x[:, :2], bias=attention_bias(seen, 2, 0), decode=True, causal=True,
                               mutable=["cache"])  # prefill of 2, then one step at cache position 2
        step, _ = layer.apply({**variables, **cache}, x[:, 2:3], bias=attention_bias(seen, 1, 2), decode=True,
                              causal=True, mutable=["cache"])
        outs[impl] = np.asarray(step)
    np.testing.assert_array_equal(outs["xla"], outs["einsum"])
    np.testing.assert_array_equal(outs["splash"], outs["einsum"])


def test_attention_dropout_needs_the_einsum_path():
    cfg = tiny(vocab_size=97, attention_impl="xla")
    assert cfg.text.attention_dropout > 0  # HF's default, 0.1
    pixels, ids, attn, img, seg = _packed_batch(np.random.default_rng(0), cfg)
    model = Kosmos2(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), pixels, ids, attn, img))["params"]
    forward = lambda p, deterministic: model.apply({"params": p}, pixels, ids, attn, img, deterministic=deterministic,
                                                   rngs={"dropout": jax.random.PRNGKey(1)})
    with pytest.raises(ValueError, match="no attention dropout"):
        jax.eval_shape(lambda p: forward(p, False), params)
    jax.eval_shape(lambda p: forward(p, True), params)  # deterministic forwards are fine


def test_attention_impl_errors():
    assert ATTENTION_IMPLS == ("einsum", "xla", "cudnn", "splash")
    with pytest.raises(ValueError, match="attention_impl 'flash' not in"):
        tiny(attention_impl="flash")
    with pytest.raises(ValueError, match="bfloat16 or float16, not dtype='float32'"):
        tiny(attention_impl="cudnn")
    assert tiny(attention_impl="cudnn", dtype="bfloat16").attention_impl == "cudnn"


def test_a_params_checkpoint_loads_with_the_default_attention(tmp_path):
    from kosmos2_jax import weights

    model = Kosmos2(tiny(vocab_size=97, attention_impl="cudnn", dtype="bfloat16"))
    params = {"w": np.ones((2, 3), np.float32)}
    weights.save_checkpoint(str(tmp_path), model.config, params)
    with open(tmp_path / "model_config.json") as f:
        saved = json.load(f)
    assert saved["attention_impl"] == "einsum" and saved["text"] == json.loads(json.dumps(model.config.to_dict()))["text"]


@pytest.mark.parametrize("q_len,kv_len,causal", [(9, 9, True), (6, 5, False)])
def test_fused_attention_pads_odd_lengths_exactly(q_len, kv_len, causal):
    """cuDNN's training rule rejects odd lengths; `fused_attention` pads them and hides the extra key.
    Checked on the `xla` path, which runs the same padding lines."""
    from kosmos2_jax.models.layers import fused_attention

    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 3, 8)), jnp.float32) for n in (q_len, kv_len, kv_len))
    mask = rng.random((2, 1, q_len, kv_len)) < 0.7
    mask[..., 0] = True  # every query sees a key
    if causal:
        mask &= np.tril(np.ones((q_len, kv_len), bool))

    def reference(q, k, v):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) + jnp.where(mask, 0.0, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)

    fused = lambda q, k, v: fused_attention(q, k, v, jnp.asarray(mask), causal, "xla")
    np.testing.assert_allclose(fused(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-6)
    grad = lambda f: jax.grad(lambda *a: (f(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grad(fused), grad(reference)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
