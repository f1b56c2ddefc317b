"""Params checkpoints (`kosmos2_jax.weights.checkpoint`): one standard Orbax PyTree that plain Orbax restores,
read back by us chunk by chunk into the target layout and shardings; older layouts still load."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from hf_reference import SMALL_CONFIGS, grounded_batch, hf_logits, hf_model
from kosmos2_jax.weights import checkpoint
from kosmos2_jax import weights
from kosmos2_jax import convert
from kosmos2_jax.models import Kosmos2, tiny

from conftest import xla_flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model's params (every leaf distinct) saved with `save_checkpoint`."""
    model = Kosmos2(tiny(vocab_size=300))
    abstract = checkpoint.abstract_params(model)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save_checkpoint(str(folder), model.config, params)
    return folder, model, params


def _equal(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_plain_orbax_restores_it(saved):
    import orbax.checkpoint as ocp

    folder, _, params = saved
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    restored = ocp.StandardCheckpointer().restore(str(folder / "params"), abstract)
    _equal(restored, params)
    assert not (folder / "params" / "manifest.ocdbt").exists()  # the layout read in place


def test_restore_reads_the_layout_in_place(saved):
    folder, model, params = saved
    loaded_model, loaded = checkpoint.restore_params(str(folder))
    assert loaded_model.config == model.config
    _equal(loaded, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(loaded))
    _, host = checkpoint.restore_params(str(folder), numpy=True)
    _equal(host, params)
    _, leaves = checkpoint.iter_checkpoint_leaves(str(folder))
    _equal(traverse_util.unflatten_dict(dict(leaves)), params)


def test_decoder_split_per_layer(saved):
    folder, model, params = saved
    split_model, split = checkpoint.restore_params(str(folder), scan_text_layers=False)
    assert model.config.scan_layers and not split_model.config.text_layers_scanned
    layers = split["text_model"]["layers"]
    stacked = params["text_model"]["layers"]["layer"]
    assert sorted(layers) == [f"layer_{i}" for i in range(model.config.text.layers)]
    for i in range(model.config.text.layers):
        _equal(layers[f"layer_{i}"], jax.tree_util.tree_map(lambda x: x[i], stacked))
    _equal(split["vision_model"], params["vision_model"])  # the vision tower stays scanned
    _, unrolled = checkpoint.restore_params(str(folder), scan_layers=False)  # both towers per layer
    for i in range(model.config.vision.num_hidden_layers):
        _equal(unrolled["vision_model"]["encoder"][f"layer_{i}"],
               jax.tree_util.tree_map(lambda x: x[i], params["vision_model"]["encoder"]["layer"]))
    _equal(unrolled["text_model"]["layers"], split["text_model"]["layers"])
    q = model.config.latent_query_num
    ids = np.concatenate([[[0, 5]], np.arange(4, 4 + q)[None], [[6, 7, 8, 9]]], axis=1).astype(np.int32)
    img = np.zeros_like(ids)
    img[:, 2:2 + q] = 1
    pixels = np.random.default_rng(1).standard_normal((1, 28, 28, 3)).astype(np.float32)
    a = model.apply({"params": params}, pixels, ids, np.ones_like(ids), img)
    b = split_model.apply({"params": split}, pixels, ids, np.ones_like(ids), img)
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())  # the same math, another loop


def test_unrolled_decoder_generates_the_same_tokens(saved):
    from kosmos2_jax.inference.generate import generate

    folder, model, params = saved
    split_model, split = checkpoint.restore_params(str(folder), scan_text_layers=False)
    q = model.config.latent_query_num
    ids = np.concatenate([[[0, 5]], np.arange(4, 4 + q)[None], [[6, 7, 8]]], axis=1).astype(np.int32)
    img = np.zeros_like(ids)
    img[:, 2:2 + q] = 1
    inputs = dict(input_ids=ids, attention_mask=np.ones_like(ids), image_embeds_position_mask=img,
                  pixel_values=np.random.default_rng(2).standard_normal((1, 28, 28, 3)).astype(np.float32))
    for beams in (1, 2):
        a = generate(model, params, inputs, max_new_tokens=6, num_beams=beams, eos_token_id=-1)
        b = generate(split_model, split, inputs, max_new_tokens=6, num_beams=beams, eos_token_id=-1)
        np.testing.assert_array_equal(a.sequences, b.sequences)


def test_shapes_from_the_metadata_are_the_traced_ones(saved, tmp_path):
    """`stored_abstract_params` (no tracing) gives the shapes and dtypes `abstract_params` traces,
    in every layout; a restore handed them returns the same params. Other folders: None."""
    import dataclasses

    import orbax.checkpoint as ocp

    folder, model, params = saved
    for layout in ({}, {"scan_text_layers": False}, {"scan_layers": False}):
        stored = checkpoint.stored_abstract_params(str(folder), **layout)
        traced = checkpoint.abstract_params(Kosmos2(model.config.replace(**layout)))
        assert jax.tree_util.tree_structure(stored) == jax.tree_util.tree_structure(traced)
        for a, b in zip(jax.tree_util.tree_leaves(stored), jax.tree_util.tree_leaves(traced)):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)
        _, restored = checkpoint.restore_params(str(folder), abstract=stored, **layout)
        _, reference = checkpoint.restore_params(str(folder), **layout)
        _equal(restored, reference)
    stored = checkpoint.stored_abstract_params(str(folder))
    checkpoint.check_fits(str(folder), stored, model)
    wider = Kosmos2(model.config.replace(text=dataclasses.replace(model.config.text, ffn_dim=model.config.text.ffn_dim + 8)))
    with pytest.raises(ValueError, match="fc1.*has shape .*model_config.json says"):
        checkpoint.check_fits(str(folder), stored, wider)
    (tmp_path / "ocdbt").mkdir()
    (tmp_path / "ocdbt" / "model_config.json").write_text((folder / "model_config.json").read_text())
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(tmp_path / "ocdbt" / "params"), params)
    assert checkpoint.stored_abstract_params(str(tmp_path / "ocdbt")) is None


def test_restore_into_shardings_reads_each_chunk_once(saved, monkeypatch):
    """Onto a mesh: every shard holds its slice; a chunk is read once per distinct shard it
    overlaps, never once per device (replicas share one read)."""
    folder, model, params = saved
    calls = []
    real = checkpoint.ZarrArray.read_chunk_into
    monkeypatch.setattr(checkpoint.ZarrArray, "read_chunk_into",
                        lambda self, c, r, o: (calls.append((self.folder, c, r)), real(self, c, r, o))[1])
    device = jax.local_devices()[0]
    mesh = jax.sharding.Mesh(np.array([device]), ("fsdp",))
    shardings = jax.tree_util.tree_map(
        lambda x: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), params)
    _, loaded = checkpoint.restore_params(str(folder), shardings=shardings)
    _equal(loaded, params)
    assert len(calls) == len(set(calls))
    assert all(x.sharding == jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
               for x in jax.tree_util.tree_leaves(loaded))


def test_restore_onto_several_devices(saved):
    """In a process with 4 CPU devices: sharded along the leading axis and replicated leaves."""
    folder, _, _ = saved
    script = f"""
import jax, numpy as np
from flax import traverse_util
from kosmos2_jax.weights import checkpoint
P = jax.sharding.PartitionSpec
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
_, host = checkpoint.restore_params({str(folder)!r}, numpy=True)
spec = lambda x: P("fsdp") if x.ndim and x.shape[0] % 4 == 0 else P()
shardings = jax.tree_util.tree_map(lambda x: jax.sharding.NamedSharding(mesh, spec(x)), host)
_, loaded = checkpoint.restore_params({str(folder)!r}, shardings=shardings)
split = 0
for path, x in traverse_util.flatten_dict(loaded).items():
    ref = traverse_util.flatten_dict(host)[path]
    np.testing.assert_array_equal(np.asarray(x), ref)
    for shard in x.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), ref[shard.index])
    split += x.sharding.spec == P("fsdp")
assert split > 10, split
print("OK", split)
"""
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-3000:]


def test_other_orbax_layouts_load(saved, tmp_path):
    """A default Orbax save (OCDBT, compressed) restores through Orbax."""
    import orbax.checkpoint as ocp

    folder, model, params = saved
    config = json.loads((folder / "model_config.json").read_text())
    (tmp_path / "ocdbt").mkdir()
    (tmp_path / "ocdbt" / "model_config.json").write_text(json.dumps(config))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(tmp_path / "ocdbt" / "params"), params)
    assert (tmp_path / "ocdbt" / "params" / "manifest.ocdbt").exists()
    for name in ("ocdbt",):
        _, loaded = checkpoint.load_checkpoint(str(tmp_path / name))
        _equal(loaded, params)
        _, split = checkpoint.load_checkpoint(str(tmp_path / name), scan_text_layers=False)
        _equal(split["text_model"]["layers"]["layer_1"],
               jax.tree_util.tree_map(lambda x: x[1], params["text_model"]["layers"]["layer"]))


def test_damaged_checkpoints_name_the_problem(saved, tmp_path):
    import shutil

    folder, _, _ = saved
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    fc1 = broken / "params" / "text_model.layers.layer.ffn.fc1.kernel"
    chunk = next(p for p in sorted(fc1.rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:-30])
    with pytest.raises(ValueError, match="fc1.kernel.*(damaged|truncated)"):
        checkpoint.load_checkpoint(str(broken))
    shutil.rmtree(fc1)
    with pytest.raises(ValueError, match="text_model/layers/layer/ffn/fc1/kernel is missing"):
        checkpoint.load_checkpoint(str(broken))
    config = json.loads((folder / "model_config.json").read_text())
    config["text"]["ffn_dim"] += 8
    (broken / "model_config.json").write_text(json.dumps(config))
    shutil.copytree(folder / "params" / fc1.name, fc1)
    with pytest.raises(ValueError, match="fc1.*has shape .*model_config.json says"):
        checkpoint.load_checkpoint(str(broken))


def test_converted_folder_decodes_like_hf(tmp_path):
    """`convert from-hf` -> `load_model(..., **DECODING)`: the unrolled decoder's logits equal HF's."""
    name, vision, text, queries = SMALL_CONFIGS[0]
    hf = hf_model(vision, text, queries)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert convert.main(["from-hf", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "params" / "_METADATA").exists()
    for source in ("ckpt", "hf"):
        model, params = weights.load_model(str(tmp_path / source), **weights.DECODING)
        assert "layer_0" in params["text_model"]["layers"]
        pixels, ids, attn, img = grounded_batch(np.random.default_rng(3), 2, queries, text["vocab_size"],
                                                vision["image_size"], [queries + 6, queries + 4])
        ours = np.asarray(model.apply({"params": params}, pixels, ids, attn, img))
        ref = hf_logits(hf, pixels, ids, attn, img)
        assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
