"""benchmarks/train_mfu.py: its model-FLOPs formula against the matmuls the model really runs, and a
CPU smoke run of the trainer's step through it."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import train_mfu  # noqa: E402

from kosmos2_jax.models import Kosmos2, Kosmos2Config, TextConfig, VisionConfig  # noqa: E402


def _matmul_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general and convolution in a (closed) jaxpr, scans times
    their length."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (_, rc), (_, rb) = eqn.params["dimension_numbers"]
            free_rhs = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
            total += 2 * np.prod(lhs) * np.prod(free_rhs)
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_channels = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / out_channels
        for name, sub in eqn.params.items():
            subs = sub if isinstance(sub, (tuple, list)) else [sub]
            for s in subs:
                inner = getattr(s, "jaxpr", s)
                if hasattr(inner, "eqns"):
                    total += _matmul_flops(inner) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


def test_forward_flops_match_the_models_matmuls():
    config = Kosmos2Config(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28, patch_size=7),
        text=TextConfig(vocab_size=300, embed_dim=48, layers=3, ffn_dim=96, attention_heads=4),
        latent_query_num=8, scan_layers=True)
    rows, seq_len, slots = 2, 64, 3
    batch, _ = train_mfu.packed_batch(config, rows, seq_len, 2, slots, 6, np.random.default_rng(0))
    model = Kosmos2(config)
    pixels = jnp.asarray(batch["pixel_values"], jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), pixels, batch["input_ids"],
                                               batch["attention_mask"], batch["image_embeds_position_mask"],
                                               segment_ids=batch["segment_ids"])["params"])
    forward = lambda p: model.apply({"params": p}, pixels, batch["input_ids"], batch["attention_mask"],
                                    batch["image_embeds_position_mask"], segment_ids=batch["segment_ids"],
                                    return_hidden=True)
    measured = _matmul_flops(jax.make_jaxpr(forward)(params).jaxpr)
    # the model runs the vision tower on every slot, so count every slot as an image here
    expected = sum(train_mfu.forward_flops(config, rows, seq_len, rows * slots).values())
    assert measured == expected, (measured, expected)


def test_packed_batch_is_the_pipelines_layout():
    config = Kosmos2Config(text=TextConfig(vocab_size=300), latent_query_num=8,
                           vision=VisionConfig(image_size=28, patch_size=7))
    batch, targets = train_mfu.packed_batch(config, 2, 100, 3, 4, 10, np.random.default_rng(0))
    assert batch["pixel_values"].shape == (2, 4, 28, 28, 3)
    assert batch["segment_ids"][0].max() == 3 and batch["image_embeds_position_mask"].sum() == 2 * 3 * 8
    assert targets == 2 * 3 * 11  # 10 caption tokens and </s> per example


def test_peak_lookup():
    kind = lambda k: type("D", (), {"device_kind": k})()
    assert train_mfu.peak_tflops(kind("NVIDIA H100 80GB HBM3")) == 989.4
    assert train_mfu.peak_tflops(kind("TPU v5 lite")) == 197.0
    assert train_mfu.peak_tflops(kind("cpu")) is None


def test_tiny_smoke_run(capsys, tmp_path):
    out = train_mfu.main(["--tiny", "--steps", "1", "--rows", "2", "--profile", str(tmp_path), "--profile_steps", "2"])
    assert np.isfinite(out["loss"]) and out["step_s"] > 0 and out["model_flops"] > 0
    text = capsys.readouterr().out
    assert "| step (median of 1) |" in text and "attention einsum" in text
    # the profile: every part of the model shows up with time, matmuls and attention among it
    table = out["profile"]["table"]
    parts = {p for p, _ in table}
    assert {"vision tower", "resampler", "decoder", "LM head + loss", "optimizer"} <= parts, parts
    kinds = {k: sum(v for (_, q), v in table.items() if q == k) for k in ("matmul", "attention")}
    assert all(v > 0 for v in kinds.values()), kinds
    total = sum(table.values())
    assert table.get(("other", "other"), 0.0) < 0.5 * total  # most time is attributed to a part
    assert "| decoder |" in text and "| LM head + loss |" in text
