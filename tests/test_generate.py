"""Generation equals HF `generate` token for token (greedy, beam search, n-gram blocking)."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import xla_flags
from hf_reference import SMALL_CONFIGS, grounded_batch, hf_model, torch
from kosmos2_jax import weights
from kosmos2_jax.inference.generate import ban_repeated_ngrams, generate, top_p_filter
from kosmos2_jax.models import Kosmos2, tiny

NAME, VISION, TEXT, QUERIES = SMALL_CONFIGS[0]
# both decoding modes, the accelerator mode with several dispatches of a few steps each
MODES = {"layerwise": dict(decode_mode="layerwise"), "fused": dict(decode_mode="fused", tokens_per_call=5)}
modes = pytest.mark.parametrize("mode", sorted(MODES))


@pytest.fixture(scope="module")
def models():
    hf = hf_model(VISION, TEXT, QUERIES, seed=3)
    with torch.no_grad():  # make </s> a frequent candidate so that beams and rows finish early
        hf.text_model.model.embed_tokens.weight[2] *= 4.0
    config = weights.config_from_hf(hf.config.to_dict())
    return hf, Kosmos2(config), weights.params_from_hf(hf.state_dict(), config)


def _batch(with_image, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [QUERIES + 9, QUERIES + 4, QUERIES + 6]
    pixels, ids, attn, img = grounded_batch(rng, 3, QUERIES, TEXT["vocab_size"], VISION["image_size"], lengths,
                                            left_pad_rows=(0, 1, 2))
    if not with_image:
        ids = np.where(img == 1, rng.integers(7, TEXT["vocab_size"], ids.shape), ids)
        return dict(input_ids=ids, attention_mask=attn)
    return dict(input_ids=ids, attention_mask=attn, image_embeds_position_mask=img, pixel_values=pixels)


def _hf_generate(hf, batch, **kwargs):
    t = {k: torch.from_numpy(v) for k, v in batch.items() if k != "pixel_values"}
    with torch.no_grad():
        if "pixel_values" in batch:
            out = hf.generate(pixel_values=torch.from_numpy(batch["pixel_values"].transpose(0, 3, 1, 2)),
                              input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                              image_embeds_position_mask=t["image_embeds_position_mask"], **kwargs)
        else:
            out = hf.text_model.generate(input_ids=t["input_ids"], attention_mask=t["attention_mask"], **kwargs)
    return out


@modes
@pytest.mark.parametrize("with_image", [True, False])
@pytest.mark.parametrize("ngram", [0, 3])
def test_greedy_equals_hf(models, with_image, ngram, mode):
    hf, model, params = models
    batch = _batch(with_image, seed=ngram)
    ref = _hf_generate(hf, batch, max_new_tokens=24, do_sample=False, num_beams=1, no_repeat_ngram_size=ngram,
                       output_scores=True, return_dict_in_generate=True)
    ours = generate(model, params, batch, max_new_tokens=24, no_repeat_ngram_size=ngram, **MODES[mode])
    np.testing.assert_array_equal(ours.sequences, ref.sequences.numpy())
    ref_logp = hf.text_model.compute_transition_scores(ref.sequences, ref.scores, normalize_logits=True).numpy()
    new = ours.sequences[:, -ours.scores.shape[1]:]
    live = np.cumsum(np.pad(new == 2, ((0, 0), (1, 0)))[:, :-1], axis=1) == 0  # up to and including </s>
    np.testing.assert_allclose(ours.scores[live], ref_logp[live], atol=1e-4)
    assert (ours.scores[~live] == 0).all()


@modes
@pytest.mark.parametrize("num_beams", [3, 5])
@pytest.mark.parametrize("ngram", [0, 3])
def test_beam_search_equals_hf(models, num_beams, ngram, mode):
    hf, model, params = models
    batch = _batch(True, seed=10 + num_beams + ngram)
    ref = _hf_generate(hf, batch, max_new_tokens=16, num_beams=num_beams, no_repeat_ngram_size=ngram,
                       do_sample=False, output_scores=True, return_dict_in_generate=True)
    ours = generate(model, params, batch, max_new_tokens=16, num_beams=num_beams, no_repeat_ngram_size=ngram,
                    **MODES[mode])
    np.testing.assert_array_equal(ours.sequences, ref.sequences.numpy())
    np.testing.assert_allclose(ours.sequence_scores, ref.sequences_scores.numpy(), atol=1e-4)


@modes
def test_beam_search_text_only_equals_hf(models, mode):
    hf, model, params = models
    batch = _batch(False, seed=5)
    ref = _hf_generate(hf, batch, max_new_tokens=12, num_beams=4, no_repeat_ngram_size=3, do_sample=False)
    ours = generate(model, params, batch, max_new_tokens=12, num_beams=4, no_repeat_ngram_size=3, **MODES[mode])
    np.testing.assert_array_equal(ours.sequences, ref.numpy())


def test_eos_paths_are_exercised(models):
    hf, model, params = models
    greedy = generate(model, params, _batch(True, seed=3), max_new_tokens=24, no_repeat_ngram_size=3)
    assert (greedy.sequences[:, -24:] == 2).any(), "no row ended: the tests would not cover finished rows"
    beams = [generate(model, params, _batch(True, seed=10 + k + n), max_new_tokens=16, num_beams=k,
                      no_repeat_ngram_size=n) for k in (3, 5) for n in (0, 3)]
    assert any((b.sequences[:, -16:] == 2).any() for b in beams), "no beam hypothesis ended with </s>"


def test_bucketing_reuses_compilations_and_keeps_results(models):
    hf, model, params = models
    batch = _batch(True, seed=1)
    a = generate(model, params, batch, max_new_tokens=8, bucket=32)
    b = generate(model, params, batch, max_new_tokens=8, bucket=128)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    from kosmos2_jax.inference.generate import _compiled

    before = _compiled.cache_info().misses
    shorter = {k: v[:, 1:] for k, v in batch.items() if k != "pixel_values"}
    shorter["pixel_values"] = batch["pixel_values"]
    generate(model, params, shorter, max_new_tokens=8, bucket=32)  # same bucket -> no new program
    assert _compiled.cache_info().misses == before


@modes
def test_sampling_is_reproducible_and_respects_top_p(models, mode):
    hf, model, params = models
    batch = _batch(True, seed=2)
    run = lambda seed, **kw: generate(model, params, batch, max_new_tokens=10, do_sample=True,
                                      rng=jax.random.PRNGKey(seed), **MODES[mode], **kw).sequences
    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))
    greedy = generate(model, params, batch, max_new_tokens=10).sequences
    np.testing.assert_array_equal(run(0, top_p=1e-6), greedy)  # only the top token survives
    if mode == "fused":  # the same random numbers as the per-layer programs draw
        np.testing.assert_array_equal(run(0), generate(model, params, batch, max_new_tokens=10, do_sample=True,
                                                       rng=jax.random.PRNGKey(0), decode_mode="layerwise").sequences)


def test_top_p_on_known_logits():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = np.log(probs).astype(np.float32)
    kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, p)))[0].tolist()
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.7) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    samples = jax.random.categorical(jax.random.PRNGKey(0), top_p_filter(np.repeat(logits, 4000, 0), 0.7))
    freq = np.bincount(np.asarray(samples), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)


def test_ngram_ban_equals_hf_processor():
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4):
        tokens = rng.integers(0, 5, (6, 14))
        scores = rng.standard_normal((6, 5)).astype(np.float32)
        for cur in range(1, 15):
            ref = NoRepeatNGramLogitsProcessor(n)(torch.from_numpy(tokens[:, :cur]), torch.from_numpy(scores)).numpy()
            ours = np.asarray(ban_repeated_ngrams(scores, tokens, cur, 0, n))
            np.testing.assert_array_equal(ours, ref)


def test_bad_generation_inputs(models):
    hf, model, params = models
    batch = _batch(True)
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        generate(model, params, batch, max_new_tokens=250)
    right = dict(batch, attention_mask=batch["attention_mask"][:, ::-1].copy())
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, params, right, max_new_tokens=4)
    with pytest.raises(ValueError, match="rng"):
        generate(model, params, batch, max_new_tokens=4, do_sample=True)


@modes
@pytest.mark.parametrize("scan_layers", [True, False])
def test_interleaved_greedy_equals_full_forwards(scan_layers, mode):
    """Two images a row ([B, N, H, W, 3]), both weight layouts: generation's layer-by-layer cached
    decoding picks the tokens that greedy decoding by uncached full forwards picks."""
    config = dataclasses.replace(tiny(), scan_layers=scan_layers)
    model, q, rng = Kosmos2(config), config.latent_query_num, np.random.default_rng(0)
    text = lambda n: rng.integers(10, config.text.vocab_size, (2, n))
    ids = np.concatenate([np.zeros((2, 1)), np.full((2, q), 5), text(3), np.full((2, q), 5), text(4)], 1).astype(np.int32)
    slots = np.concatenate([np.zeros((2, 1)), np.ones((2, q)), np.zeros((2, 3)), np.ones((2, q)), np.zeros((2, 4))], 1)
    slots = slots.astype(np.int32)
    pixels = rng.normal(size=(2, 2, config.vision.image_size, config.vision.image_size, 3)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(1), pixels, ids, image_embeds_position_mask=slots)["params"]
    out = generate(model, params, dict(input_ids=ids, attention_mask=np.ones_like(ids),
                                       image_embeds_position_mask=slots, pixel_values=pixels), max_new_tokens=5,
                   **MODES[mode])
    seq, mask, logp = ids, slots, []
    for _ in range(5):
        logits = model.apply({"params": params}, pixels, seq, image_embeds_position_mask=mask)[:, -1]
        nxt = np.argmax(logits, axis=-1)
        logp.append(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), nxt[:, None], axis=1)[:, 0])
        seq = np.concatenate([seq, nxt[:, None].astype(np.int32)], axis=1)
        mask = np.pad(mask, ((0, 0), (0, 1)))
    np.testing.assert_array_equal(out.sequences, seq)
    np.testing.assert_allclose(out.scores, np.stack(logp, axis=1), rtol=0, atol=1e-5)


def test_fused_mode_dispatches_once_per_k_tokens_and_reads_a_step_behind(models, monkeypatch):
    """The accelerator mode on the CPU, counted (not timed): the compiled programs it runs and the
    blocking device->host reads, for 24 new tokens at K = 4 and K = 24 (rows that never end: no
    early stop)."""
    from kosmos2_jax.inference import generate as gen

    hf, model, params = models
    batch = _batch(True, seed=0)
    eos_free = dict(eos_token_id=-1)  # no row ends: every step runs
    for k in (4, 24):
        counts = {"dispatch": 0, "read": 0}
        real_read, real_call = gen._read, gen._FusedProgram.__call__

        def counting_call(self, *args):
            parts = {name: _counted(fn, counts) for name, fn in self.parts.items()}
            return real_call(dataclasses.replace(self, parts=parts), *args)

        def counting_read(flag):
            counts["read"] += 1
            return real_read(flag)

        monkeypatch.setattr(gen._FusedProgram, "__call__", counting_call)
        monkeypatch.setattr(gen, "_read", counting_read)
        out = generate(model, params, batch, max_new_tokens=24, decode_mode="fused", tokens_per_call=k, **eos_free)
        monkeypatch.undo()
        assert out.sequences.shape[1] == batch["input_ids"].shape[1] + 24
        assert counts["dispatch"] == 1 + 24 // k, counts  # the prefill, then one call per K tokens
        assert counts["read"] <= 24 // k, counts  # the stop flag, a call behind: at most one per K tokens
        layerwise = generate(model, params, batch, max_new_tokens=24, decode_mode="layerwise", **eos_free)
        np.testing.assert_array_equal(out.sequences, layerwise.sequences)


def _counted(fn, counts):
    def call(*args):
        counts["dispatch"] += 1
        return fn(*args)
    return call


def test_auto_mode_is_layerwise_on_the_cpu_and_fused_elsewhere():
    from kosmos2_jax.inference.generate import resolve_decode_mode
    from kosmos2_jax.utils.errors import UsageError

    assert resolve_decode_mode("auto", "cpu") == "layerwise"
    assert resolve_decode_mode("auto", "gpu") == resolve_decode_mode("auto", "tpu") == "fused"
    assert resolve_decode_mode("layerwise", "tpu") == "layerwise"
    with pytest.raises(UsageError, match="decode_mode 'fast'"):
        resolve_decode_mode("fast")


def test_sharded_generation_equals_hf():
    """tests/sharded_generate_check.py with 4 devices: params on a (fsdp=2, tensor=2) mesh, scanned
    and unrolled layers, greedy and beam search equal HF; the KV cache is sharded."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(pathlib.Path(__file__).parent / "sharded_generate_check.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "OK" in out.stdout
