"""`model.remat_policy`: every policy computes the same loss and gradients as no remat, the
name-based ones keep exactly the tagged activations, and bad names fail in the config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kosmos2_jax.models import Kosmos2, tiny
from kosmos2_jax.models.layers import CHECKPOINT_NAMES, NAMED_POLICIES

# one policy per way a name resolves: a project alias, a jax.checkpoint_policies name, the
# names-to-save parser, and full remat (every jax policy goes through the same lookup)
POLICIES = ["full", "dots", "minimal_with_context", "save:context+mlp_in"]


def _batch(cfg):
    rng = np.random.default_rng(0)
    ids = rng.integers(4, cfg.text.vocab_size, size=(2, 24)).astype(np.int32)
    img = np.zeros_like(ids)
    img[:, 2:2 + cfg.latent_query_num] = 1
    pixels = rng.standard_normal((2, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return pixels, ids, np.ones_like(ids), img


def _loss(cfg):
    model = Kosmos2(cfg)

    def loss(p, pixels, ids, attn, img):
        logits = model.apply({"params": p}, pixels, ids, attn, img)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    return loss


@pytest.mark.parametrize("scan,policies", [(True, POLICIES), (False, ["full", "minimal_with_context"])])
def test_every_remat_policy_gives_the_same_loss_and_gradients(scan, policies):
    base = tiny(vocab_size=97, scan_layers=scan)
    batch = _batch(base)
    params = Kosmos2(base).init(jax.random.PRNGKey(0), *batch)["params"]
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(_loss(base)))(params, *batch)
    for name in policies:
        loss, grads = jax.jit(jax.value_and_grad(_loss(base.replace(remat_policy=name))))(params, *batch)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, err_msg=name)
        for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6, err_msg=name)


def _saved_names(policy):
    """The `checkpoint_name` tags among the residuals the backward keeps."""
    from jax._src.ad_checkpoint import saved_residuals

    cfg = tiny(vocab_size=97, scan_layers=False, remat_policy=policy)
    batch = _batch(cfg)
    params = jax.eval_shape(lambda: Kosmos2(cfg).init(jax.random.PRNGKey(0), *batch))["params"]
    found = set()
    for _, where in saved_residuals(_loss(cfg), params, *batch):
        found.update(n for n in CHECKPOINT_NAMES if f"named '{n}'" in where)
    return found


def test_name_based_policies_keep_the_tagged_activations():
    # (a tagged value the backward does not need, such as fc2's output, is never a residual)
    minimal = _saved_names("minimal")
    assert {"query_proj", "key_proj", "value_proj", "mlp_in"} <= minimal <= set(NAMED_POLICIES["minimal"])
    assert _saved_names("minimal_with_context") == minimal | {"context"}
    assert _saved_names("save:context+mlp_in") == {"context", "mlp_in"}
    assert _saved_names("full") == set()


def test_unknown_remat_policies_fail_in_the_config():
    with pytest.raises(ValueError, match="remat_policy 'fastest' not in none, full"):
        tiny(remat_policy="fastest")
    with pytest.raises(ValueError, match="names must be some of query_proj"):
        tiny(remat_policy="save:query_proj+attn_weights")
    assert tiny(remat_policy="checkpoint_dots").remat_policy == "checkpoint_dots"
