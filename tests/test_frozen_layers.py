"""Frozen vision layers under `nn.scan` (`frozen_vision_layers`, set by `train.freeze`): the
same gradients for the trained parameters as masking a single scan, none for the frozen ones, and
no backward through the frozen layers."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import traverse_util

from kosmos2_jax.models import Kosmos2, tiny
from kosmos2_jax.models.config import VisionConfig
from kosmos2_jax.train.optim import trainable_mask


def _setup(frozen):
    base = tiny(vocab_size=97)
    cfg = base.replace(vision=VisionConfig(**{**base.vision.__dict__, "num_hidden_layers": 5}),
                       frozen_vision_layers=frozen)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 97, size=(2, 20)).astype(np.int32)
    img = np.zeros_like(ids)
    img[:, 2:2 + cfg.latent_query_num] = 1
    pixels = rng.standard_normal((2, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    model = Kosmos2(cfg)

    def loss(p):
        logits = model.apply({"params": p}, pixels, ids, np.ones_like(ids), img)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1)[:, :-1], ids[:, 1:, None], -1).mean()

    return model, loss, (pixels, ids, np.ones_like(ids), img)


def test_split_scan_gradients_equal_the_masked_single_scan():
    model, masked_loss, batch = _setup(0)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), *batch)["params"])
    _, split_loss, _ = _setup(4)
    mask = trainable_mask(params, "vision_except_last", scan_layers=True)
    reference = jax.tree_util.tree_map(lambda g, m: g * m, jax.jit(jax.grad(masked_loss))(params), mask)
    split = jax.jit(jax.grad(split_loss))(params)
    np.testing.assert_allclose(float(jax.jit(split_loss)(params)), float(jax.jit(masked_loss)(params)), rtol=1e-6)
    flat, ref = traverse_util.flatten_dict(split), traverse_util.flatten_dict(reference)
    for path in ref:
        if path[:2] in (("vision_model", "patch_embedding"), ("vision_model", "pre_layrnorm")) or \
                path[-1] in ("class_embedding", "position_embedding"):
            assert not np.any(np.asarray(flat[path])), path  # before the frozen layers: no gradient
        else:
            np.testing.assert_allclose(np.asarray(flat[path]), np.asarray(ref[path]), rtol=1e-5, atol=1e-7,
                                       err_msg="/".join(path))
    fc1 = np.asarray(flat[("vision_model", "encoder", "layer", "fc1", "kernel")])
    assert not fc1[:4].any() and fc1[4].any()  # the frozen layers' slice is zero, the last layer's is not


def _scan_lengths(loss, params):
    lengths = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                lengths.append(eqn.params["length"])
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    return lengths


def test_no_backward_through_the_frozen_layers():
    """The gradient program runs the scan of the 4 frozen layers once (forward only); a single
    scan of all 5 layers runs twice (forward and backward), whatever the mask."""
    model, masked_loss, batch = _setup(0)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *batch))["params"]
    _, split_loss, _ = _setup(4)
    assert _scan_lengths(masked_loss, params).count(5) == 2
    split = _scan_lengths(split_loss, params)
    assert split.count(4) == 1 and split.count(1) == 2 and 5 not in split


def test_weight_decay_masks_and_trained_only_updates():
    import optax

    from kosmos2_jax.train.optim import make_optimizer, weight_decay_mask

    params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "stack": {"kernel": jnp.ones((4, 2))}}
    mask = {"dense": {"kernel": jnp.ones(()), "bias": jnp.zeros(())},
            "stack": {"kernel": jnp.array([0.0, 0.0, 1.0, 1.0]).reshape(4, 1)}}
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    for decay, bias_moves in (("all", True), ("matrices", False)):
        cfg = _optim_config(lr=0.1, warmup_steps=0, total_steps=10, b1=0.9, b2=0.99, eps=1e-8,
                            weight_decay=0.5, clip_norm=1.0, weight_decay_mask=decay)
        tx, _ = make_optimizer(cfg)  # zero gradients: only the weight decay moves a parameter
        updates, _ = tx.update(zero_grads, tx.init(params), params)
        assert bool(jnp.any(updates["dense"]["bias"] != 0)) == bias_moves and jnp.all(updates["dense"]["kernel"] < 0)
        tx, _ = make_optimizer(cfg, mask)
        state = tx.init(params)
        updates, _ = tx.update(zero_grads, state, params)
        assert not jnp.any(updates["dense"]["bias"]) and not jnp.any(updates["stack"]["kernel"][:2])
        assert jnp.all(updates["stack"]["kernel"][2:] < 0)
        adam = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState)][0]
        assert isinstance(adam.mu["dense"]["bias"], optax.MaskedNode) and adam.mu["stack"]["kernel"].shape == (2, 2)
    assert weight_decay_mask("all") is None


def test_lr_multipliers_scale_the_matching_updates():
    """`optim.lr_multipliers`: the first matching pattern's factor scales a parameter's whole AdamW
    update (its learning rate), also on the trained layers of a partly frozen stack."""
    import pytest

    from kosmos2_jax.train.optim import lr_multipliers, make_optimizer, parse_lr_multipliers

    params = {"attn": {"q_proj": {"kernel": jnp.ones((2, 3))}, "v_proj": {"kernel": jnp.ones((2, 3))}},
              "stack": {"kernel": jnp.ones((4, 2))}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    mask = {"attn": {"q_proj": {"kernel": jnp.ones(())}, "v_proj": {"kernel": jnp.ones(())}},
            "stack": {"kernel": jnp.array([0.0, 0.0, 1.0, 1.0]).reshape(4, 1)}}

    def updates(spec, mask=None):
        cfg = _optim_config(lr=0.1, warmup_steps=0, total_steps=10, b1=0.9, b2=0.99, eps=1e-8,
                            weight_decay=0.0, clip_norm=0.0, lr_multipliers=spec)
        tx, _ = make_optimizer(cfg, mask)
        return tx.update(grads, tx.init(params), params)[0]

    plain, scaled = updates(""), updates(r"q_proj=0.25,attn/=2,stack=0")
    np.testing.assert_allclose(scaled["attn"]["q_proj"]["kernel"], 0.25 * plain["attn"]["q_proj"]["kernel"])
    np.testing.assert_allclose(scaled["attn"]["v_proj"]["kernel"], 2 * plain["attn"]["v_proj"]["kernel"])
    assert not jnp.any(scaled["stack"]["kernel"]) and jnp.all(plain["stack"]["kernel"] < 0)
    partly = updates("stack=0.5", mask)["stack"]["kernel"]
    assert not jnp.any(partly[:2])
    np.testing.assert_allclose(partly[2:], 0.5 * updates("", mask)["stack"]["kernel"][2:])
    assert lr_multipliers(params, "q_proj=0.25,attn/=2") == {"attn/q_proj/kernel": 0.25, "attn/v_proj/kernel": 2.0}
    with pytest.raises(ValueError, match="'qproj' matches no parameter"):
        lr_multipliers(params, "qproj=0.5")
    for bad in ("q_proj", "=2", "(=1", "q_proj=-1", "q_proj=half"):
        with pytest.raises(ValueError, match="is not REGEX=FACTOR"):
            parse_lr_multipliers(bad)


def _optim_config(**settings):
    """presets.base()'s `optim` (every key with its default) with `settings`."""
    from kosmos2_jax.train import presets

    cfg = presets.base().optim
    cfg.unlock()
    cfg.update(settings)
    return cfg


def _muon_config(**extra):
    return _optim_config(lr=0.1, warmup_steps=0, total_steps=10, b1=0.9, b2=0.98, eps=1e-8,
                         weight_decay=0.0, clip_norm=0.0, optimizer="muon", **extra)


def _singular_spread(matrix) -> float:
    """max / min singular value"""
    s = np.linalg.svd(np.asarray(matrix), compute_uv=False)
    return s.max() / s.min()


def test_muon_orthogonalizes_the_dense_kernels_only():
    """`optim.optimizer=muon`: a dense kernel's update has near-equal singular values (orthogonalized
    momentum), each layer of a scanned stack on its own; embeddings and biases get AdamW's
    elementwise update; a frozen layer of a stack gets none."""
    from kosmos2_jax.train.optim import make_optimizer

    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.ones((8, 6)), "bias": jnp.ones(6)},
              "stack": {"kernel": jnp.ones((3, 6, 4))}, "embed_tokens": {"embedding": jnp.ones((10, 6))}}
    grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    cfg = _muon_config()
    tx, _ = make_optimizer(cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    spread = _singular_spread

    assert spread(updates["dense"]["kernel"]) < 2 and spread(grads["dense"]["kernel"]) > 3
    assert all(spread(u) < 2 < 3 < spread(g) for u, g in zip(updates["stack"]["kernel"], grads["stack"]["kernel"]))
    # AdamW's first step: -lr * sign(g) (Nesterov, as optax.contrib.muon's Adam part, scales it)
    for leaf in (("dense", "bias"), ("embed_tokens", "embedding")):
        u, g = updates[leaf[0]][leaf[1]], grads[leaf[0]][leaf[1]]
        np.testing.assert_array_equal(np.sign(u), -np.sign(g))
        assert np.ptp(np.abs(np.asarray(u))) < 1e-3 * cfg.lr
    mask = {"dense": {"kernel": jnp.ones(()), "bias": jnp.ones(())},
            "stack": {"kernel": jnp.array([0.0, 1.0, 1.0]).reshape(3, 1, 1)},
            "embed_tokens": {"embedding": jnp.ones(())}}
    tx, _ = make_optimizer(cfg, mask)
    partly = tx.update(grads, tx.init(params), params)[0]["stack"]["kernel"]
    assert not jnp.any(partly[0]) and all(spread(layer) < 2 for layer in partly[1:])


def test_muon_ns_steps_sets_how_orthogonal_an_update_is():
    """`optim.muon_ns_steps`: fewer Newton-Schulz iterations leave the update's singular values
    further apart; 5 (the default, optax's) is what a config without the key gets."""
    from kosmos2_jax.train.optim import make_optimizer

    params = {"dense": {"kernel": jnp.ones((32, 16))}}
    rng = np.random.default_rng(1)
    # a gradient with singular values from 1 down to 0.01, as real ones spread
    u, _ = np.linalg.qr(rng.standard_normal((32, 16)))
    v, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    grads = {"dense": {"kernel": jnp.asarray(u @ np.diag(np.geomspace(1, 0.01, 16)) @ v.T, jnp.float32)}}

    def update(**extra):
        tx, _ = make_optimizer(_muon_config(**extra))
        return _singular_spread(tx.update(grads, tx.init(params), params)[0]["dense"]["kernel"])

    default, five, three, one = update(), update(muon_ns_steps=5), update(muon_ns_steps=3), update(muon_ns_steps=1)
    assert default == five
    assert five < 2 < 3 < three < one
