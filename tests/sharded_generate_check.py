"""Run as a script with 4 fake CPU devices (see test_generate.py): generation with the params
sharded over a (fsdp=2, tensor=2) mesh, scanned and unrolled decoder layers, equals HF `generate`
token for token (greedy with n-gram blocking, beam search), and the KV cache is sharded."""

import os
import sys

assert "xla_force_host_platform_device_count=4" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from hf_reference import SMALL_CONFIGS, grounded_batch, hf_model  # noqa: E402

from kosmos2_jax import weights  # noqa: E402
from kosmos2_jax.inference import generate as gen  # noqa: E402
from kosmos2_jax.models import Kosmos2  # noqa: E402
from kosmos2_jax.models import sharding  # noqa: E402
from kosmos2_jax.utils.errors import UsageError  # noqa: E402


def main():
    assert len(jax.devices()) == 4, jax.devices()
    _, vision, text, queries = SMALL_CONFIGS[0]
    hf = hf_model(vision, text, queries, seed=3)
    rng = np.random.default_rng(0)
    pixels, ids, attn, img = grounded_batch(rng, 4, queries, text["vocab_size"], vision["image_size"],
                                            [queries + 9, queries + 4, queries + 6, queries + 5],
                                            left_pad_rows=(0, 1, 2, 3))
    batch = dict(input_ids=ids, attention_mask=attn, image_embeds_position_mask=img, pixel_values=pixels)
    mesh = sharding.mesh_from_text("fsdp=2,tensor=2")
    for scan in (False, True):
        config = weights.config_from_hf(hf.config.to_dict(), scan_layers=scan)
        model = Kosmos2(config)
        params = gen.shard_params(model, weights.params_from_hf(hf.state_dict(), config), mesh)
        fc1 = params["text_model"]["layers"]["layer" if scan else "layer_0"]["ffn"]["fc1"]["kernel"]
        assert len(fc1.sharding.device_set) == 4 and not fc1.sharding.is_fully_replicated, fc1.sharding
        for options in (dict(no_repeat_ngram_size=3), dict(num_beams=3)):
            with torch.no_grad():
                ref = hf.generate(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                                  input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn),
                                  image_embeds_position_mask=torch.from_numpy(img), max_new_tokens=12,
                                  do_sample=False, **options)
            ours = gen.generate(model, params, batch, max_new_tokens=12, mesh=mesh, tokens_per_call=5, **options)
            np.testing.assert_array_equal(ours.sequences, ref.numpy())
        program = gen._compiled_fused(model, gen._Settings(4, 1, False, 1.0, 1.0, 0, 2, 1, 1.0, "fused", 4), 4, 80,
                                      True, mesh)["prefill_all"]
        _, cache, _ = program(params, *(np.asarray(x, np.int32) for x in np.zeros((3, 4, 80))),
                              np.asarray(pixels), jax.random.PRNGKey(0))
        keys = [x for path, x in jax.tree_util.tree_leaves_with_path(cache) if "cached_key" in str(path[-1])]
        assert keys and all(not k.sharding.is_fully_replicated for k in keys), [k.sharding for k in keys]
    try:
        gen.generate(model, params, batch, max_new_tokens=2, mesh=mesh, decode_mode="layerwise")
        raise AssertionError("layerwise on a mesh was accepted")
    except UsageError as e:
        assert "layerwise" in str(e), e
    print("OK")


if __name__ == "__main__":
    main()
