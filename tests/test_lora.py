"""LoRA / QLoRA through Qwix (`train.lora`, train/lora.py): zero adapters are the base model, only
adapters train and have optimizer state, the merged export is the adapted model, QLoRA is close to
the base and trains, checkpoints hold the adapters and resume exactly, errors name the setting.
(Two processes: tests/test_pods.py.)"""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import REPO

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)


def _lora(rank=4, alpha=8.0, base_dtype="float", targets=None):
    import ml_collections

    from kosmos2_jax.train.lora import DEFAULT_TARGETS

    return ml_collections.ConfigDict(dict(rank=rank, alpha=alpha, targets=targets or DEFAULT_TARGETS,
                                          base_dtype=base_dtype))


def _inputs(cfg, batch=2, length=16, seed=1):
    q = cfg.latent_query_num
    ids = jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 4, cfg.text.vocab_size)
    pixels = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, cfg.vision.image_size, cfg.vision.image_size, 3))
    slots = jnp.zeros((batch, length), bool).at[:, 1:1 + q].set(True)
    return pixels, ids, None, slots


def _models(scan: bool, **lora):
    import flax.linen as nn

    from kosmos2_jax.models import Kosmos2
    from kosmos2_jax.models.config import tiny
    from kosmos2_jax.train import lora as lora_lib

    base = Kosmos2(tiny(vocab_size=300, scan_layers=scan))
    inputs = _inputs(base.config)
    params = nn.unbox(base.init(jax.random.PRNGKey(0), *inputs)["params"])
    settings = _lora(**lora)
    adapted = lora_lib.apply(base, settings)
    fresh = nn.unbox(adapted.init(jax.random.PRNGKey(3), *inputs)["params"])
    return base, adapted, settings, params, lora_lib.with_base(fresh, params), inputs


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_zero_adapters_are_the_base_model_and_the_merge_is_the_adapted_model(scan):
    from kosmos2_jax.train import lora

    base, adapted, settings, params, full, inputs = _models(scan)
    names = ["/".join(p) for p in traverse_util.flatten_dict(lora.adapters(full))]
    assert len(names) == 12 * (1 if scan else 2), names  # (q, k, v, out, fc1, fc2) x (a, b) per layer
    assert all(n.startswith("text_model/layers/") for n in names)
    np.testing.assert_array_equal(base.apply({"params": params}, *inputs), adapted.apply({"params": full}, *inputs))

    # nonzero adapters: the merged plain params give the adapted forward
    leaves = traverse_util.flatten_dict(full)
    for i, path in enumerate(p for p in leaves if lora.is_adapter(p)):
        leaves[path] = 0.05 * jax.random.normal(jax.random.PRNGKey(10 + i), leaves[path].shape)
    full = traverse_util.unflatten_dict(leaves)
    out = adapted.apply({"params": full}, *inputs)
    merged = lora.merge(full, settings)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    assert np.abs(out - base.apply({"params": params}, *inputs)).max() > 1e-3  # the adapters do something
    np.testing.assert_allclose(base.apply({"params": merged}, *inputs), out, atol=1e-5)


@pytest.mark.parametrize("base_dtype,tolerance", [("int8", 0.02), ("nf4", 0.2)])
def test_qlora_forward_is_close_to_the_base_and_its_adapters_get_gradients(base_dtype, tolerance):
    """QLoRA holds the adapted kernels quantized (per output channel int8; nf4 blocks): the
    logits stay within `tolerance` of the float model's (their scale is ~1)."""
    from kosmos2_jax.train import lora

    base, adapted, settings, params, full, inputs = _models(True, base_dtype=base_dtype)
    flat = traverse_util.flatten_dict(full, is_leaf=lambda _, x: hasattr(x, "how"))
    kernel = flat[("text_model", "layers", "layer", "ffn", "fc1", "kernel")]
    assert kernel.array.qvalue.dtype == {"int8": jnp.int8, "nf4": jnp.uint4}[base_dtype]
    assert kernel.array.qvalue.shape[0] == 2  # one quantized kernel per scanned layer
    ref = base.apply({"params": params}, *inputs)
    out = adapted.apply({"params": full}, *inputs)
    assert 0 < np.abs(out - ref).max() < tolerance * np.abs(ref).max()

    def loss(adapters):
        return jnp.mean(adapted.apply({"params": lora.with_adapters(full, adapters)}, *inputs) ** 2)

    grads = jax.grad(loss)(lora.adapters(full))
    assert all(np.abs(g).max() > 0 for p, g in traverse_util.flatten_dict(grads).items() if p[-1].endswith("_b"))


def _trainer(shapes_tfds, small_spm, steps=3, dtype="float32", **lora):
    import train_tiny_config

    from kosmos2_jax.data.examples import ExampleConfig
    from kosmos2_jax.data.pipeline import Pipeline, Source
    from kosmos2_jax.format.processor import Kosmos2Processor
    from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer
    from kosmos2_jax.models import Kosmos2
    from kosmos2_jax.train import loop
    from kosmos2_jax.train.trainer import Trainer, model_config

    cfg = train_tiny_config.get_config(f"{shapes_tfds},{small_spm}")
    cfg.model.text.dropout = 0.0
    cfg.model.dtype = dtype
    cfg.train.lora.update(_lora(**lora))
    tok = Kosmos2Tokenizer.from_file(small_spm)
    pipe = Pipeline([Source("s", "grit", data_dir=cfg.data.sources.train.data_dir)], Kosmos2Processor(tok, 32, 8),
                    ExampleConfig(seq_len=48), 8, seed=0, num_workers=1)
    trainer = Trainer(Kosmos2(model_config(cfg, tok.vocab_size)), cfg, tok.first_location_id,
                      train_step=loop.train_step, eval_step=loop.eval_step)
    return trainer, [next(pipe) for _ in range(steps)]


@pytest.mark.parametrize("base_dtype,dtype", [("float", "float32"), ("int8", "float32"), ("float", "bfloat16")])
def test_only_the_adapters_train_and_only_they_have_optimizer_state(shapes_tfds, small_spm, base_dtype, dtype):
    """(bfloat16 compute: the adapters' float32 delta is cast back, as a scanned layer's carry needs.)"""
    from kosmos2_jax.train import lora

    trainer, batches = _trainer(shapes_tfds, small_spm, base_dtype=base_dtype, dtype=dtype)
    before = jax.device_get(trainer.state["params"])
    adapters = lora.count_adapters(before)
    total, trainable = trainer.parameter_counts()
    assert trainable == adapters < total / 10
    # AdamW: two moments per adapter parameter (float32), step counts, nothing for the base
    assert 0 <= trainer.optimizer_state_bytes() - 2 * 4 * adapters <= 16
    losses = [float(jax.device_get(trainer.train_step(b))["nll_sum"]) for b in batches]
    after = jax.device_get(trainer.state["params"])
    changed = {"/".join(str(getattr(k, "key", k)) for k in p): not np.array_equal(a, b)
               for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree_util.tree_leaves(after))}
    assert all(changed[n] for n in changed if "_lora_b" in n)  # B leaves the zero init
    assert not any(v for n, v in changed.items() if "_lora_" not in n)
    assert losses[-1] < losses[0]


def _cmd(workdir, shapes_tfds, small_spm, *extra):
    return [sys.executable, "-m", "kosmos2_jax.train", f"--config={HERE}/train_tiny_config.py:{shapes_tfds},{small_spm}",
            f"--workdir={workdir}", "--config.train.lora.rank=4", "--config.model.text.dropout=0",
            "--config.train.steps=6", "--config.train.ckpt_every=2", *extra]


def test_a_lora_run_stopped_resumed_and_exported_through_the_cli(shapes_tfds, small_spm, tmp_path):
    """QLoRA (int8) checkpoints hold the adapters (and their optimizer state), not the base; a
    run stopped by SIGTERM and resumed exports what an uninterrupted one does; `export` merges
    the adapters into params `predict` reads, `--adapters_only` writes them alone."""
    from kosmos2_jax import weights

    run = lambda w, *x: subprocess.run(_cmd(w, shapes_tfds, small_spm, "--config.train.lora.base_dtype=int8", *x),
                                       capture_output=True, text=True, cwd=REPO)
    done = run(tmp_path / "a")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "in LoRA adapters" in done.stdout and "optimizer state" in done.stdout
    proc = subprocess.Popen(_cmd(tmp_path / "b", shapes_tfds, small_spm, "--config.train.lora.base_dtype=int8"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert max(map(int, os.listdir(tmp_path / "b" / "checkpoints"))) < 6
    again = run(tmp_path / "b")
    assert again.returncode == 0 and "resumed from step" in again.stdout, again.stdout + again.stderr
    a, b = (jax.device_get(weights.load_checkpoint(str(tmp_path / w / "export"))[1]) for w in "ab")
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)

    saved = json.load(open(tmp_path / "a" / "checkpoints" / "6" / "state" / "_METADATA"))["tree_metadata"]
    params = [k for k in saved if k.startswith("('params'")]
    assert len(params) == 12 and all("_lora_" in k for k in params)  # the frozen base is not in the checkpoint
    out = subprocess.run([sys.executable, "-m", "kosmos2_jax.export", "--workdir", str(tmp_path / "a"),
                          "--out", str(tmp_path / "merged")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "LoRA adapters merged" in out.stdout, out.stdout + out.stderr
    merged = jax.device_get(weights.load_checkpoint(str(tmp_path / "merged"))[1])
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), merged, a)
    only = subprocess.run([sys.executable, "-m", "kosmos2_jax.export", "--workdir", str(tmp_path / "a"),
                           "--out", str(tmp_path / "adapters"), "--adapters_only"], capture_output=True, text=True,
                          cwd=REPO)
    assert only.returncode == 0, only.stdout + only.stderr
    settings = json.load(open(tmp_path / "adapters" / "lora.json"))
    assert settings["rank"] == 4 and settings["base_dtype"] == "int8"
    pred = subprocess.run([sys.executable, "-m", "kosmos2_jax.predict", "--checkpoint", str(tmp_path / "merged"),
                           "--tokenizer", small_spm, "--image", os.path.join(REPO, "docs", "ablation_demo.png"),
                           "--prompt", "<grounding> a", "--max_new_tokens", "4"], capture_output=True, text=True,
                          cwd=REPO)
    assert pred.returncode == 0, pred.stdout + pred.stderr


def test_clear_errors(shapes_tfds, small_spm, tmp_path):
    cases = [("--config.train.lora.targets=vision_model/nothing", "matches no dense layer"),
             ("--config.train.lora.base_dtype=int3", "base_dtype='int3' not in"),
             ("--config.train.freeze=vision_except_last", "LoRA trains the adapters alone"),
             ("--config.train.lora.targets=(", "is not a regular expression")]
    for flag, message in cases:
        out = subprocess.run(_cmd(tmp_path / "e", shapes_tfds, small_spm, flag), capture_output=True, text=True,
                             cwd=REPO)
        assert out.returncode != 0 and message in out.stderr + out.stdout, (flag, out.stderr[-2000:])
        assert "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "e" / "checkpoints")
