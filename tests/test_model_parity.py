"""The Flax model computes what HF's Kosmos2ForConditionalGeneration computes (float32, eval)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from hf_reference import SMALL_CONFIGS, grounded_batch, hf_image_features, hf_logits, hf_model
from kosmos2_jax import weights
from kosmos2_jax import convert
from kosmos2_jax.models import Kosmos2


def _ours(hf, **overrides):
    config = weights.config_from_hf(hf.config.to_dict(), **overrides)
    return Kosmos2(config), weights.params_from_hf(hf.state_dict(), config)


def _close(ours, ref, tol=1e-4):
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(np.asarray(ours) - ref).max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x scale {scale:.3g}"


@pytest.mark.parametrize("name, vision, text, queries", SMALL_CONFIGS, ids=[c[0] for c in SMALL_CONFIGS])
def test_logits_equal_hf(name, vision, text, queries):
    hf = hf_model(vision, text, queries)
    model, params = _ours(hf)
    rng = np.random.default_rng(0)
    lengths = [queries + 12, queries + 7, queries + 12, queries + 4]
    pixels, ids, attn, img_mask = grounded_batch(rng, 4, queries, text["vocab_size"], vision["image_size"], lengths,
                                                 left_pad_rows=(1,))
    ours = jax.jit(model.apply)({"params": params}, pixels, ids, attn, img_mask)
    _close(ours, hf_logits(hf, pixels, ids, attn, img_mask))

    feats = model.apply({"params": params}, pixels, method=Kosmos2.image_features)
    _close(feats, hf_image_features(hf, pixels))

    # text only, left and right padding mixed
    text_ids = np.ones((3, 9), np.int64)
    text_attn = np.zeros_like(text_ids)
    for b, (n, left) in enumerate([(9, False), (5, True), (6, False)]):
        row = np.concatenate([[0], rng.integers(4, text["vocab_size"], n - 1)])
        sl = slice(9 - n, 9) if left else slice(0, n)
        text_ids[b, sl], text_attn[b, sl] = row, 1
    ours = model.apply({"params": params}, None, text_ids, text_attn)
    _close(ours, hf_logits(hf, None, text_ids, text_attn, None))


def test_unscanned_and_remat_variants_equal_hf():
    name, vision, text, queries = SMALL_CONFIGS[0]
    hf = hf_model(vision, text, queries, seed=1)
    pixels, ids, attn, img_mask = grounded_batch(np.random.default_rng(1), 2, queries, text["vocab_size"],
                                                 vision["image_size"], [queries + 6, queries + 3])
    ref = hf_logits(hf, pixels, ids, attn, img_mask)
    for overrides in (dict(scan_layers=False), dict(remat_policy="full"), dict(scan_layers=False, remat_policy="dots")):
        model, params = _ours(hf, **overrides)
        _close(model.apply({"params": params}, pixels, ids, attn, img_mask), ref)


def test_interpolated_positions_equal_hf():
    name, vision, text, queries = SMALL_CONFIGS[0]
    hf = hf_model(vision, text, queries, seed=2)
    model, params = _ours(hf)
    pixels = np.random.default_rng(2).standard_normal((2, 42, 42, 3)).astype(np.float32)  # 6x6 grid, not 4x4
    feats = model.apply({"params": params}, pixels, interpolate_pos_encoding=True, method=Kosmos2.image_features)
    _close(feats, hf_image_features(hf, pixels, interpolate=True))
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model.apply({"params": params}, pixels, method=Kosmos2.image_features)


def test_state_dict_round_trip_is_exact():
    name, vision, text, queries = SMALL_CONFIGS[1]
    hf = hf_model(vision, text, queries)
    model, params = _ours(hf)
    back = weights.state_dict_from_params(params)
    ref = {k: v.numpy() for k, v in hf.state_dict().items() if k != "text_model.lm_head.weight"}
    assert sorted(back) == sorted(ref)
    for key in ref:
        np.testing.assert_array_equal(back[key], ref[key], err_msg=key)


def test_checkpoint_folders_both_ways(tmp_path):
    name, vision, text, queries = SMALL_CONFIGS[0]
    hf = hf_model(vision, text, queries)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert convert.main(["from-hf", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    model, params = weights.load_checkpoint(tmp_path / "ckpt")
    assert {"_METADATA", "image_to_text_projection.dense.bias"} <= set(os.listdir(tmp_path / "ckpt" / "params"))
    assert convert.main(["to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf2")]) == 0
    import transformers

    reloaded = transformers.Kosmos2ForConditionalGeneration.from_pretrained(tmp_path / "hf2").eval()
    shutil.rmtree(tmp_path / "ckpt" / "params" / "text_model.layer_norm.scale")
    with pytest.raises(ValueError, match="text_model/layer_norm/scale is missing"):
        weights.load_checkpoint(tmp_path / "ckpt")
    for key, value in hf.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    pixels, ids, attn, img_mask = grounded_batch(np.random.default_rng(3), 1, queries, text["vocab_size"],
                                                 vision["image_size"], [queries + 5])
    _close(model.apply({"params": params}, pixels, ids, attn, img_mask), hf_logits(reloaded, pixels, ids, attn, img_mask))


def test_pytorch_bin_folder(tmp_path):
    name, vision, text, queries = SMALL_CONFIGS[0]
    hf = hf_model(vision, text, queries)
    hf.save_pretrained(tmp_path, safe_serialization=False)
    model, params = weights.load_hf(str(tmp_path))
    ref = weights.params_from_hf(hf.state_dict(), model.config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref)


def test_bad_checkpoints(tmp_path):
    name, vision, text, queries = SMALL_CONFIGS[0]
    hf = hf_model(vision, text, queries)
    config = weights.config_from_hf(hf.config.to_dict())
    state = dict(hf.state_dict())
    key = "text_model.model.layers.1.ffn.fc1.weight"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        weights.params_from_hf(missing, config)
    bad = dict(state, **{key: state[key][:, :10]})
    with pytest.raises(ValueError, match=r"fc1\.weight.*\(128, 10\).*\(128, 64\)"):
        weights.params_from_hf(bad, config)
    with pytest.raises(ValueError, match="unexpected.*extra.weight"):
        weights.params_from_hf(dict(state, **{"extra.weight": state[key]}), config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        weights.load_hf(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text(json.dumps(hf.config.to_dict()))
    with pytest.raises(ValueError, match="no weights"):
        weights.load_hf(str(tmp_path / "empty"))
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    with pytest.raises(ValueError, match="model.safetensors"):
        weights.load_hf(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not a kosmos2_jax checkpoint"):
        weights.load_checkpoint(tmp_path / "empty")


def test_full_size_parameter_count():
    import transformers

    from kosmos2_jax.models import kosmos2_1p6b

    shapes = weights.abstract_params(Kosmos2(kosmos2_1p6b()))
    ours = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    with transformers.modeling_utils.no_init_weights(), __import__("torch").device("meta"):
        hf = transformers.Kosmos2ForConditionalGeneration(transformers.Kosmos2Config())
    # On the meta device HF does not tie the head; it is the token embedding in the released model.
    theirs = sum(p.numel() for n, p in hf.named_parameters() if n != "text_model.lm_head.weight")
    assert ours == theirs == 1_664_485_376
    assert weights.config_from_hf(transformers.Kosmos2Config().to_dict()) == kosmos2_1p6b()
