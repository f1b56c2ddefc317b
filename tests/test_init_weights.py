"""`weights.load_params_for`: weights to start a run from (an HF folder or a kosmos2_jax checkpoint),
laid out for the run's model config, which keeps its own compute settings."""

import dataclasses
import os
import sys

import jax
import numpy as np
import pytest

from kosmos2_jax import weights
from kosmos2_jax.models import Kosmos2, tiny


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A scanned tiny model's params, saved as a kosmos2_jax checkpoint and as an HF folder:
    (folder, HF state dict)."""
    tmp_path = tmp_path_factory.mktemp("weights")
    config = tiny(vocab_size=97, scan_layers=True)
    params = jax.device_get(jax.jit(lambda: Kosmos2(config).init(
        jax.random.PRNGKey(3), np.zeros((1, 28, 28, 3), np.float32), np.ones((1, 11), np.int32), None,
        np.pad(np.ones((1, 8), np.int32), ((0, 0), (2, 1))))["params"])())
    weights.save_checkpoint(str(tmp_path / "ckpt"), config, params)
    weights.export_hf(str(tmp_path / "hf"), config, params)
    return tmp_path, weights.state_dict_from_params(params)


@pytest.mark.parametrize("source", ["ckpt", "hf"])
def test_weights_are_laid_out_for_the_runs_config(saved, source):
    tmp_path, expected = saved
    run = tiny(vocab_size=97, scan_layers=False, dtype="bfloat16", remat_policy="full", attention_impl="xla")
    run = run.replace(text=dataclasses.replace(run.text, dropout=0.0))  # dropout is the run's to set
    params = weights.load_params_for(run, str(tmp_path / source))
    assert "layer_1" in params["text_model"]["layers"]  # unscanned: one subtree per layer
    shapes = jax.tree_util.tree_map(np.shape, params)
    assert shapes == jax.tree_util.tree_map(np.shape, weights.abstract_params(Kosmos2(run)))
    got = weights.state_dict_from_params(params)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_another_architecture_is_a_clear_error(saved):
    tmp_path, _ = saved
    other = tiny(vocab_size=97)
    other = other.replace(latent_query_num=4, text=dataclasses.replace(other.text, layers=3))
    with pytest.raises(ValueError, match=r"latent_query_num: 8 vs 4; text.layers: 2 vs 3"):
        weights.load_params_for(other, str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="no config.json"):
        weights.load_params_for(other, str(tmp_path / "nowhere"))


def test_the_released_models_architecture_is_the_experiment_configs():
    """finetune_refcoco.py / kosmos2_instruct.py start from the released weights: HF's
    `Kosmos2Config()` (microsoft/kosmos-2-patch14-224) must pass their architecture check."""
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import finetune_refcoco
    import kosmos2_instruct
    from kosmos2_jax.train.trainer import model_config

    released = weights.config_from_hf(transformers.Kosmos2Config().to_dict())
    for experiment in (finetune_refcoco, kosmos2_instruct):
        config = model_config(experiment.get_config(), 65037)
        assert weights.architecture_differences(released, config) == [], experiment.__name__
    assert weights.architecture_differences(released, tiny()) != []
