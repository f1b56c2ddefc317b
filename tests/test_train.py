"""Training: SIGTERM, mesh equivalence, gradient accumulation, freezing, errors (several processes,
SIGKILL and resume, export: tests/test_pods.py)."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from conftest import xla_flags, REPO
from kosmos2_jax.format.images import CLIP_MEAN, CLIP_STD

HERE = os.path.dirname(__file__)


def _cmd(workdir, data_root, spm, *extra):
    return [sys.executable, "-m", "kosmos2_jax.train", f"--config={HERE}/train_tiny_config.py:{data_root},{spm}",
            f"--workdir={workdir}", *extra]


def _params(workdir):
    from kosmos2_jax import weights

    return jax.device_get(weights.load_checkpoint(os.path.join(workdir, "export"))[1])


@pytest.mark.parametrize("sig,name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_sigterm_or_ctrl_c_saves_and_exits(shapes_tfds, small_spm, tmp_path, sig, name):
    proc = subprocess.Popen(_cmd(tmp_path / "c", shapes_tfds, small_spm, "--config.train.steps=400"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 3/"):
            proc.send_signal(sig)
        if f"{name}: saved step" in line:
            step = int(line.split("saved step")[1].split(",")[0])
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, "".join(seen) + rest
    assert "Traceback" not in "".join(seen) + rest
    assert os.path.isdir(tmp_path / "c" / "checkpoints" / str(step))


def test_sigterm_right_after_a_skipped_save_saves_the_next_step(shapes_tfds, small_spm, tmp_path, monkeypatch, capsys):
    """SIGTERM landing between a (skipped, off-interval) save and the flag check must not claim that
    step was saved: the run saves the next step and says so (the race behind an old flake)."""
    sys.path.insert(0, HERE)
    import train_tiny_config

    from kosmos2_jax.train import checkpoints
    from kosmos2_jax.train.loop import run

    real_save = checkpoints.Checkpoints.save

    def save_then_sigterm(self, step, *args, **kwargs):
        saved = real_save(self, step, *args, **kwargs)
        if step == 2:
            assert not saved  # off the save interval (ckpt_every=4)
            os.kill(os.getpid(), signal.SIGTERM)
        return saved

    monkeypatch.setattr(checkpoints.Checkpoints, "save", save_then_sigterm)
    cfg = train_tiny_config.get_config(f"{shapes_tfds},{small_spm}")
    cfg.train.steps = 400
    run(cfg, str(tmp_path))
    assert "SIGTERM: saved step 3, exiting" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "3"]


def test_a_muon_run_stopped_and_resumed_equals_one_uninterrupted(shapes_tfds, small_spm, tmp_path, monkeypatch):
    """`optim.optimizer=muon`: its state (momentum for the kernels, AdamW moments for the rest)
    round-trips through the checkpoint: 4 steps, stopped by a SIGTERM and resumed, export the
    params of 4 steps in one go."""
    sys.path.insert(0, HERE)
    import train_tiny_config

    from kosmos2_jax.train import checkpoints
    from kosmos2_jax.train.loop import run

    cfg = train_tiny_config.get_config(f"{shapes_tfds},{small_spm}")
    cfg.optim.optimizer = "muon"
    cfg.model.text.dropout = 0.0
    cfg.train.update(steps=4, ckpt_every=2, eval_every=0)
    run(cfg, str(tmp_path / "a"))
    real_save = checkpoints.Checkpoints.save

    def save_then_sigterm(self, step, *args, **kwargs):
        saved = real_save(self, step, *args, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return saved

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints.Checkpoints, "save", save_then_sigterm)
        run(cfg, str(tmp_path / "b"))
    assert max(map(int, os.listdir(tmp_path / "b" / "checkpoints"))) < 4  # stopped before the end
    run(cfg, str(tmp_path / "b"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, _params(tmp_path / "a"), _params(tmp_path / "b"))


def test_mesh_2x2x2_equals_single_device(shapes_tfds, small_spm):
    """8 devices with 2 micro-batches per step against 1 device with none: the same losses, and
    the strided micro-batches move no data — the step holds no more all-to-all or
    collective-permute ops than one step on a micro-batch alone (contiguous micro-batches, each
    on half of the devices, made 32 collective-permutes of that 10)."""
    losses = {}
    for devices, mesh, accum in ((8, "2,2,2", "2"), (1, "1,1,1", "1")):
        env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")
        out = subprocess.run([sys.executable, os.path.join(HERE, "trainer_mesh_check.py"), str(shapes_tfds),
                              small_spm, mesh, accum], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        losses[mesh] = json.loads(out.stdout.split("LOSSES")[1])
        slots = json.loads(out.stdout.split("SLOTS")[1].split("LOSSES")[0])
        assert any(ran < total for ran, total in slots), slots  # the vision tower skipped empty slots
        if accum == "2":
            moves = json.loads(out.stdout.split("MOVES")[1].split("\n")[0])
            micro = json.loads(out.stdout.split("MICRO_MOVES")[1].split("\n")[0])
            assert all(moves[op] <= micro[op] for op in micro), (moves, micro)
    np.testing.assert_allclose(losses["2,2,2"], losses["1,1,1"], rtol=1e-5)
    assert losses["1,1,1"][2] != losses["1,1,1"][0]


def test_muon_on_a_2x2x2_mesh_equals_single_device(shapes_tfds, small_spm):
    """`optim.optimizer=muon` with scanned layers: the Newton-Schulz steps on fsdp- and
    tensor-sharded stacks of kernels give the single device's losses."""
    losses = {}
    for devices, mesh in ((8, "2,2,2"), (1, "1,1,1")):
        env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")
        out = subprocess.run([sys.executable, os.path.join(HERE, "trainer_mesh_check.py"), str(shapes_tfds),
                              small_spm, mesh, "1", "muon"], capture_output=True, text=True, env=env, cwd=REPO,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        losses[mesh] = json.loads(out.stdout.split("LOSSES")[1])
    np.testing.assert_allclose(losses["2,2,2"], losses["1,1,1"], rtol=1e-5)
    assert losses["1,1,1"][2] < losses["1,1,1"][0]


def _trainer(shapes_tfds, small_spm, packed=False, **train):
    sys.path.insert(0, HERE)
    import train_tiny_config

    from kosmos2_jax.data.examples import ExampleConfig
    from kosmos2_jax.data.pipeline import Pipeline, Source
    from kosmos2_jax.models import Kosmos2
    from kosmos2_jax.format.processor import Kosmos2Processor
    from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer
    from kosmos2_jax.train import loop
    from kosmos2_jax.train.trainer import Trainer, model_config

    cfg = train_tiny_config.get_config(f"{shapes_tfds},{small_spm}")
    cfg.model.text.dropout = 0.0
    cfg.train.update(train)
    tok = Kosmos2Tokenizer.from_file(small_spm)
    rows = dict(pack=True, pack_max_images=6) if packed else {}
    pipe = Pipeline([Source("s", "grit", data_dir=cfg.data.sources.train.data_dir)], Kosmos2Processor(tok, 32, 8),
                    ExampleConfig(seq_len=96 if packed else 48), 8, seed=0, num_workers=1, **rows)
    return Trainer(Kosmos2(model_config(cfg, tok.vocab_size)), cfg, tok.first_location_id,
                   train_step=loop.train_step, eval_step=loop.eval_step), next(pipe)


def test_gradient_accumulation_equals_one_big_batch(shapes_tfds, small_spm):
    """On packed rows with empty image slots: the compacted images split into whole blocks per
    micro-batch (one block per micro-batch here)."""
    one, batch = _trainer(shapes_tfds, small_spm, packed=True, grad_accum_steps=1)
    two, _ = _trainer(shapes_tfds, small_spm, packed=True, grad_accum_steps=2)
    m1, m2 = jax.device_get(one.train_step(batch)), jax.device_get(two.train_step(batch))
    assert two.image_groups == 2 and 0 < two.image_slots < batch["pixel_values"].shape[0] * 6
    assert m1["tokens"] == m2["tokens"]
    np.testing.assert_allclose(m1["nll_sum"], m2["nll_sum"], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6),
                           jax.device_get(one.state["params"]), jax.device_get(two.state["params"]))


def test_location_loss_weight(small_spm):
    """`train.location_loss_weight` w adds (w - 1) x the location-token nll to the loss; the
    reported nll is unweighted."""
    from kosmos2_jax.models import Kosmos2, tiny
    from kosmos2_jax.format.processor import Kosmos2Processor, encode_grounded_caption
    from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer
    from conftest import loss_and_metrics

    tok = Kosmos2Tokenizer.from_file(small_spm)
    model = Kosmos2(tiny(vocab_size=tok.vocab_size))
    proc = Kosmos2Processor(tok, 28, model.config.latent_query_num)
    seq = encode_grounded_caption(proc, "a red circle", [(0, 12, [(0.1, 0.2, 0.5, 0.6)])])
    batch = {"input_ids": seq.input_ids[None], "attention_mask": np.ones_like(seq.input_ids)[None],
             "loss_mask": seq.loss_mask[None], "image_embeds_position_mask": seq.image_embeds_position_mask[None],
             "pixel_values": np.full((1, 28, 28, 3), 128, np.uint8)}
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 3), np.float32), batch["input_ids"], None,
                        batch["image_embeds_position_mask"])["params"]
    loc = (tok.first_location_id, tok.num_location_tokens)
    plain, m1 = loss_and_metrics(model, params, batch, jax.random.PRNGKey(0), True, *loc)
    weighted, m3 = loss_and_metrics(model, params, batch, jax.random.PRNGKey(0), True, *loc, 3.0)
    logits = model.apply({"params": params}, (batch["pixel_values"] / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD),
                         batch["input_ids"], None, batch["image_embeds_position_mask"])
    logp = jax.nn.log_softmax(np.asarray(logits[0, :-1], np.float64))
    targets = seq.input_ids[1:]
    is_loc = (targets >= loc[0]) & (targets < loc[0] + loc[1])
    assert is_loc.sum() == 2
    loc_nll = -sum(logp[i, t] for i, t in enumerate(targets) if is_loc[i])
    np.testing.assert_allclose(float(weighted) - float(plain), 2.0 * loc_nll, rtol=1e-4)
    assert m1["nll_sum"] == m3["nll_sum"] == plain


def test_packed_step_equals_unpacked_step(shapes_tfds, small_spm):
    """One train step on packed rows updates the params exactly as one on the same examples unpacked."""
    from kosmos2_jax.data.examples import ExampleConfig
    from kosmos2_jax.data.pipeline import Pipeline, Source
    from kosmos2_jax.format.processor import Kosmos2Processor
    from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer

    plain_trainer, _ = _trainer(shapes_tfds, small_spm)
    packed_trainer, _ = _trainer(shapes_tfds, small_spm)
    tok = Kosmos2Tokenizer.from_file(small_spm)
    source = Source("s", "grit", data_dir=plain_trainer.config.data.sources.train.data_dir)
    pipe = lambda batch, **kw: Pipeline([source], Kosmos2Processor(tok, 32, 8), ExampleConfig(seq_len=96), batch,
                                        seed=0, num_workers=1, **kw)
    packed = next(pipe(4, pack=True, pack_max_images=6))
    count = int(packed["segment_ids"].max(axis=1).sum())
    plain = next(pipe(count))
    assert count > 4 and packed["pixel_values"].ndim == 5
    m_plain, m_packed = jax.device_get(plain_trainer.train_step(plain)), jax.device_get(packed_trainer.train_step(packed))
    # the packed step ran the vision tower on the real images only, in a block of fewer than the 24 slots
    assert packed["has_image"].sum() <= packed_trainer.image_slots < 24 == packed["pixel_values"][:, :, 0, 0, 0].size
    assert m_plain["tokens"] == m_packed["tokens"]
    np.testing.assert_allclose(m_packed["nll_sum"], m_plain["nll_sum"], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6),
                           jax.device_get(plain_trainer.state["params"]), jax.device_get(packed_trainer.state["params"]))
    # a new image capacity is a new step program; the same one again is not
    assert packed_trainer.compiled_last_step
    packed_trainer.train_step(packed)
    assert not packed_trainer.compiled_last_step


def test_step_timer_leaves_out_the_steps_that_compiled():
    """The startup line's s/step: the times of steps that compiled nothing, from reading the batch
    to the result (the first step, and a later one with a new image capacity, each take 30 s here;
    the others 0.5 s; the 5 s between the fourth and the fifth step, an evaluation, is not a step's)."""
    from kosmos2_jax.train import loop

    # the start of each step, and the end of each that compiled nothing (once 4 are timed: no more)
    times = iter([0.0, 30.0, 30.5, 30.5, 31.0, 31.0, 66.0, 66.5, 66.5, 67.0])
    timer = loop.StepTimer(steps=4, clock=lambda: next(times))
    got = []
    for compiled in [True, False, False, True, False, False, False]:
        timer.before()
        got.append(timer.after(np.zeros(()), compiled))
    assert got == [None, None, None, None, None, 0.5, None]


def test_the_eta_of_a_line_after_a_compile_uses_the_measured_step_time(tmp_path, capsys, monkeypatch):
    """The first console line's window holds the compile: its ETA extrapolates StepTimer's step
    time, not the window's mean (which counted 10 s of compiling as if every step paid it)."""
    import types

    from kosmos2_jax.train import loop

    clock = iter([0.0, 12.0, 12.0, 14.0, 14.0])  # Log's window starts and line times
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(time=lambda: next(clock)))
    log = loop.Log(str(tmp_path), primary=True)
    batch = {"attention_mask": np.ones((2, 4))}
    metrics = {"nll_sum": 1.0, "tokens": 1.0, "lr": 1e-3, "grad_norm": 1.0, "loc_correct": 0.0, "loc_tokens": 1.0}
    for compiled in [True, False, False, False]:  # the first step compiled (10 s), the others took 0.5 s
        log.step(batch, types.SimpleNamespace(compiled_last_step=compiled, image_slots=0, sources=()))
    log.step_s = 0.5
    log.line(4, 104, metrics)  # 12 s for 4 steps: 3 s a step without the fix
    assert capsys.readouterr().out.rstrip().endswith("ETA 0:50")
    for _ in range(4):  # no compile: the window's own mean
        log.step(batch, types.SimpleNamespace(compiled_last_step=False, image_slots=0, sources=()))
    log.line(8, 104, metrics)  # 2 s for 4 steps
    assert capsys.readouterr().out.rstrip().endswith("ETA 0:48")
    log.close()


@pytest.mark.parametrize("scan", [True, False])
def test_vision_except_last_mask(scan):
    """The trainable mask of `vision_except_last` on both layer layouts (the demo config loops)."""
    from flax import traverse_util

    from kosmos2_jax import weights
    from kosmos2_jax.models import Kosmos2, tiny
    from kosmos2_jax.train.optim import trainable_mask

    params = weights.abstract_params(Kosmos2(tiny(vocab_size=97, scan_layers=scan)))
    mask = traverse_util.flatten_dict(trainable_mask(params, "vision_except_last", scan))
    trained = {path: np.asarray(m).reshape(-1).tolist() for path, m in mask.items() if path[0] == "vision_model"}
    for path, m in trained.items():
        if path[1] == "post_layernorm":
            assert m == [1.0], path
        elif path[1] == "encoder":  # two layers: the last trains
            assert m == ([0.0, 1.0] if scan else [float(path[2] == "layer_1")]), path
        else:
            assert m == [0.0], path
    assert all(np.all(np.asarray(m) == 1) for path, m in mask.items() if path[0] != "vision_model")


@pytest.mark.parametrize("freeze", ["vision_except_last", "all_but_resampler"])
def test_freezing(shapes_tfds, small_spm, freeze):
    from kosmos2_jax.models import Kosmos2
    from kosmos2_jax.train.loss import location_kernel
    from conftest import loss_and_metrics
    from kosmos2_jax.train.trainer import BATCH_KEYS

    trainer, batch = _trainer(shapes_tfds, small_spm, freeze=freeze)
    before = jax.device_get(trainer.state["params"])
    # the clipped (and reported) gradient norm counts the trainable parameters only, as torch's
    # clip_grad_norm_ over requires_grad parameters does
    inputs = {k: batch[k] for k in BATCH_KEYS if k in batch}
    t = trainer.config.train  # the step's loss: location weight and soft targets (their width at step 0)
    kernel = location_kernel(round(trainer.loc[1] ** 0.5), t.location_sigma) if t.location_sigma > 0 else None
    # the gradients of every parameter, frozen ones too: a model that freezes no vision layer
    unfrozen = Kosmos2(trainer.model.config.replace(frozen_vision_layers=0))
    grads, m = jax.jit(jax.grad(lambda p: loss_and_metrics(unfrozen, p, inputs, jax.random.PRNGKey(0), True,
                                                           *trainer.loc, t.location_loss_weight, location_kernel=kernel),
                                has_aux=True))(before)
    grads = jax.tree_util.tree_map(lambda g: g / m["tokens"], grads)
    trainable = jax.tree_util.tree_map(lambda g, k: g * k, grads, trainer.mask)
    metrics = trainer.train_step(batch)  # the warm-up starts at LR 0: two steps move the trainable weights
    frozen = jax.tree_util.tree_map(lambda g, k: g * (1 - k), grads, trainer.mask)
    frozen_sq, trainable_sq = float(optax.global_norm(frozen)) ** 2, float(optax.global_norm(trainable)) ** 2
    assert frozen_sq > 0
    assert abs(float(metrics["grad_norm"]) ** 2 - trainable_sq) < 0.25 * frozen_sq
    trainer.train_step(batch)
    after = jax.device_get(trainer.state["params"])
    moved = lambda *path: not np.array_equal(_get(before, path), _get(after, path))
    # the optimizer holds moments for the trained parameters only
    adam = [s for s in jax.tree_util.tree_leaves(trainer.state["opt_state"], is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]
    assert sum(x.size for x in jax.tree_util.tree_leaves(adam.mu)) == trainer.parameter_counts()[1]
    assert isinstance(adam.mu["vision_model"]["patch_embedding"]["kernel"], optax.MaskedNode)
    if freeze == "vision_except_last":
        fc1_before = before["vision_model"]["encoder"]["layer"]["fc1"]["kernel"]
        fc1_after = after["vision_model"]["encoder"]["layer"]["fc1"]["kernel"]
        np.testing.assert_array_equal(fc1_before[:-1], fc1_after[:-1])
        assert adam.mu["vision_model"]["encoder"]["layer"]["fc1"]["kernel"].shape == (1, *fc1_before.shape[1:])
        assert not np.array_equal(fc1_before[-1], fc1_after[-1])
        assert not moved("vision_model", "patch_embedding", "kernel")
        assert moved("vision_model", "post_layernorm", "scale") and moved("text_model", "embed_tokens", "embedding")
    else:
        assert moved("image_to_text_projection", "latent_query")
        assert not moved("text_model", "embed_tokens", "embedding") and not moved("vision_model", "class_embedding")


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def test_clear_errors(shapes_tfds, small_spm, tmp_path):
    # an unknown key, out-of-range settings: tests/test_safety.py
    missing = subprocess.run(_cmd(tmp_path / "y", shapes_tfds, small_spm, f"--config.data.sources.train.data_dir={tmp_path}/none"),
                             capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and "config.data.sources.train.data_dir=" in missing.stderr, missing.stderr
    assert "no such folder" in missing.stderr
    (tmp_path / "file").write_text("x")
    unwritable = subprocess.run(_cmd(tmp_path / "file" / "w", shapes_tfds, small_spm), capture_output=True,
                                text=True, cwd=REPO)
    assert unwritable.returncode == 2 and "not writable" in unwritable.stderr
    typo = subprocess.run(_cmd(tmp_path / "t", shapes_tfds, small_spm, "--config.optim.lr_multipliers=vison_model=0.5"),
                          capture_output=True, text=True, cwd=REPO)
    assert typo.returncode == 2 and "optim.lr_multipliers: 'vison_model' matches no parameter" in typo.stderr, typo.stderr
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_a_run_starts_from_given_weights_with_its_own_settings(shapes_tfds, small_spm, tmp_path):
    """`--config.init.checkpoint`: the weights come from the checkpoint (scanned layers), the model
    settings from the config (a loop of layers, attention through jax.nn.dot_product_attention);
    with LR 0 the run's export is the checkpoint's weights, bit for bit, and so is `export` of the
    workdir on a machine without the run's attention kernel (cuDNN)."""
    import train_tiny_config
    from kosmos2_jax import weights
    from kosmos2_jax.models import Kosmos2
    from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer
    from kosmos2_jax.train.loop import model_config, run
    from kosmos2_jax.train.trainer import Trainer

    cfg = train_tiny_config.get_config(f"{shapes_tfds},{small_spm}")
    tok = Kosmos2Tokenizer.from_file(small_spm, num_location_tokens=cfg.num_location_tokens)
    init_weights = Trainer(Kosmos2(model_config(cfg, tok.vocab_size)), cfg, tok.first_location_id,
                      tok.num_location_tokens).state["params"]
    weights.save_checkpoint(str(tmp_path / "init"), model_config(cfg, tok.vocab_size), init_weights)
    cfg.init.checkpoint = str(tmp_path / "init")
    cfg.model.update(scan_layers=False, attention_impl="xla")
    cfg.model.text.dropout = 0.0
    cfg.optim.lr = 0.0
    cfg.train.steps = 1
    run(cfg, str(tmp_path / "w"))  # in-process: the same `run` that `python -m kosmos2_jax.train` calls
    with open(tmp_path / "w" / "model_config.json") as f:
        ran = json.load(f)
    assert ran["scan_layers"] is False and ran["attention_impl"] == "xla"
    exported = weights.state_dict_from_params(_params(tmp_path / "w"))
    expected = weights.state_dict_from_params(jax.device_get(init_weights))
    assert exported.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(exported[key], expected[key], err_msg=key)
    # a workdir trained with cuDNN attention exports on a machine without cuDNN (this one)
    from kosmos2_jax import export

    ran.update(attention_impl="cudnn", dtype="bfloat16")  # what a GPU run would have written
    with open(tmp_path / "w" / "model_config.json", "w") as f:
        json.dump(ran, f)
    assert export.main(["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "e")]) == 0
    again = weights.state_dict_from_params(weights.load_checkpoint(str(tmp_path / "e"))[1])
    assert all(np.array_equal(again[key], expected[key]) for key in expected)


def test_periodic_grounding_evaluation_and_a_profile_window(shapes_tfds, small_spm, tmp_path):
    """One run for two features (each run costs ~40 s of `make test`): grounding accuracy every 2
    steps, and `train.profile_start`/`profile_steps`: a trace of steps 2-3 in WORKDIR/profile and
    the table of where they spent their time."""
    run = subprocess.run(_cmd(tmp_path / "g", shapes_tfds, small_spm, "--config.train.steps=4",
                              "--config.evals.grounding.every=2", "--config.train.profile_start=2",
                              "--config.train.profile_steps=5"),  # the window ends with the run
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if "eval grounding: accuracy" in line]
    assert [line.split()[1] for line in lines] == ["2", "4"]
    # 4 items: the accuracy is a multiple of 25%
    assert all(line.endswith("(shapes validation, 4 items)") and float(line.split()[5]) % 25.0 == 0.0
               for line in lines), lines
    assert f"profile of steps 2-3 in {tmp_path / 'g' / 'profile'}" in run.stdout
    table = run.stdout.split("profile of steps", 1)[1]
    for part in ("vision tower", "decoder", "LM head + loss", "optimizer"):
        assert f"| {part} |" in table, table
    traces = [f for _, _, files in os.walk(tmp_path / "g" / "profile") for f in files if f.endswith(".xplane.pb")]
    assert len(traces) == 1
    missing = subprocess.run(_cmd(tmp_path / "h", shapes_tfds, small_spm, "--config.evals.grounding.every=2",
                                  f"--config.evals.grounding.data_dir={tmp_path}/none"), capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and "none" in missing.stderr


def test_profile_window_outside_the_run_and_per_process(monkeypatch, tmp_path, capsys):
    """A window outside the run's steps says so and traces nothing; processes of one run (on one
    host, say) trace into folders of their own."""
    from kosmos2_jax.train.loop import Profile

    outside = Profile(5, 3, str(tmp_path), 0, 2)
    assert "train.profile_start=5 is outside this run's steps [0, 2): no profile" in capsys.readouterr().out
    for step in range(2):
        outside.before(step)
    assert not outside.active and not os.path.exists(tmp_path / "profile")
    assert Profile(1, 3, str(tmp_path), 0, 10).dir == str(tmp_path / "profile")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    profile = Profile(1, 3, str(tmp_path), 0, 10)
    assert profile.dir == str(tmp_path / "profile" / "process_1") and profile.last == 3


def test_sincos_tables_linear_frequencies_tell_neighbouring_cells_apart():
    """init.*_frequencies: with MAE's log-spaced frequencies most columns of a 16-cell table are
    nearly constant, so neighbouring (and even distant) cells get almost the same embedding; the
    linear spacing up to pi per cell makes every cell's row distinct, neighbours half alike."""
    from kosmos2_jax.train.init import sincos_2d

    def similarity(table, a, b):
        return float(table[a] @ table[b] / (np.linalg.norm(table[a]) * np.linalg.norm(table[b])))

    log, linear = sincos_2d(16, 192), sincos_2d(16, 192, frequencies="linear")
    assert log.shape == linear.shape == (256, 192)
    assert similarity(log, 120, 121) > 0.95 and similarity(log, 120, 0) > 0.6
    assert 0.4 < similarity(linear, 120, 121) < 0.6 and abs(similarity(linear, 120, 0)) < 0.05
    with pytest.raises(ValueError, match="frequencies"):
        sincos_2d(16, 192, frequencies="cubic")
