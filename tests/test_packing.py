"""Sequence packing: rows of several examples compute exactly what the examples compute alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kosmos2_jax.data.examples import ExampleConfig, text_example
from kosmos2_jax.data.packing import fits, pack_row
from kosmos2_jax.data.pipeline import Pipeline, Source
from kosmos2_jax.models import Kosmos2, tiny
from kosmos2_jax.models.decoder import position_ids_from_input_ids, position_ids_from_segments
from kosmos2_jax.format.processor import Kosmos2Processor, encode_grounded_caption
from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer
from conftest import loss_and_metrics  # noqa: E402


def _example(ids, loss, image_mask, pixels, has_image, seq_len, pad=1):
    n = len(ids)
    out = {k: np.zeros(seq_len, np.int32) for k in ("input_ids", "attention_mask", "loss_mask", "image_embeds_position_mask")}
    out["input_ids"][:] = pad
    out["input_ids"][:n], out["attention_mask"][:n], out["loss_mask"][:n] = ids, 1, loss
    out["image_embeds_position_mask"][:n] = image_mask
    out["pixel_values"], out["has_image"] = pixels, np.int32(has_image)
    return out


def test_pack_row_hand_built():
    img_a, img_b = np.full((2, 2, 3), 1.0, np.float32), np.full((2, 2, 3), 2.0, np.float32)
    a = _example([0, 5, 9, 9, 2], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0], img_a, True, 12)
    t = _example([0, 7, 2], [0, 1, 1], [0, 0, 0], np.zeros((2, 2, 3), np.float32), False, 12)
    b = _example([0, 5, 8, 2], [0, 0, 1, 1], [0, 1, 0, 0], img_b, True, 12)
    assert fits(8, 1, b, 12, 2) and not fits(8, 1, b, 11, 2) and not fits(8, 1, b, 12, 1)  # a + t: 8 tokens, 1 image
    row = pack_row([a, t, b], 12, 3, pad_id=1)
    assert row["input_ids"].tolist() == [0, 5, 9, 9, 2, 0, 7, 2, 0, 5, 8, 2]
    assert row["segment_ids"].tolist() == [1] * 5 + [2] * 3 + [3] * 4
    assert row["loss_mask"].tolist() == [0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 1, 1]
    assert row["image_embeds_position_mask"].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    assert int(row["has_image"]) == 2 and row["pixel_values"].shape == (3, 2, 2, 3)
    assert (row["pixel_values"][0] == 1).all() and (row["pixel_values"][1] == 2).all() and (row["pixel_values"][2] == 0).all()
    short = pack_row([t], 6, 1, pad_id=1)
    assert short["input_ids"].tolist() == [0, 7, 2, 1, 1, 1] and short["segment_ids"].tolist() == [1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="max_images"):
        pack_row([a, b], 12, 1, pad_id=1)


def test_positions_restart_per_segment():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    pos = np.asarray(position_ids_from_segments(seg, 1))
    assert pos[0].tolist() == [2, 3, 4, 2, 3, 2, 1, 1]
    np.testing.assert_array_equal(pos[1], position_ids_from_input_ids(jnp.full((1, 8), 5), 1)[0])


def _packed_examples(small_spm):
    """(tokenizer, model, params, the three examples, their packed row as a batch of one)."""
    tok = Kosmos2Tokenizer.from_file(small_spm)
    model = Kosmos2(tiny(vocab_size=tok.vocab_size))
    processor = Kosmos2Processor(tok, image_size=28, num_image_tokens=model.config.latent_query_num)
    rng = np.random.default_rng(0)
    seq_len = 40
    examples = []
    for caption, spans in [("a red circle", [(0, 12, [(0.1, 0.1, 0.5, 0.5)])]), ("two blue squares", [])]:
        seq = encode_grounded_caption(processor, caption, spans, grounded=bool(spans))
        pixels = rng.standard_normal((28, 28, 3)).astype(np.float32)
        examples.append(_example(seq.input_ids, seq.loss_mask, seq.image_embeds_position_mask, pixels, True,
                                 seq_len, tok.pad_id))
    examples.insert(1, text_example("a green star", processor, ExampleConfig(seq_len=seq_len)))
    for ex, source in zip(examples, (1, 2, 1)):  # the text line from a second source
        ex["source_ids"] = ex["attention_mask"] * source
    total = sum(int(e["attention_mask"].sum()) for e in examples)
    row = pack_row(examples, total + 3, 3, tok.pad_id)
    packed = {k: v[None] for k, v in row.items()}
    params = model.init(jax.random.PRNGKey(0), packed["pixel_values"], packed["input_ids"], None,
                        packed["image_embeds_position_mask"])["params"]
    return tok, model, params, examples, packed


def test_packed_row_computes_each_example_as_alone(small_spm):
    """Logits and loss of a packed row (two image examples and a text line) equal those of the
    three examples each in its own padded row."""
    tok, model, params, examples, packed = _packed_examples(small_spm)
    logits = model.apply({"params": params}, packed["pixel_values"], packed["input_ids"], packed["attention_mask"],
                         packed["image_embeds_position_mask"], segment_ids=packed["segment_ids"])
    start = 0
    for ex in examples:
        n = int(ex["attention_mask"].sum())
        alone = model.apply({"params": params}, ex["pixel_values"][None] if ex["has_image"] else None,
                            ex["input_ids"][None], ex["attention_mask"][None], ex["image_embeds_position_mask"][None])
        np.testing.assert_allclose(logits[0, start:start + n], alone[0, :n], atol=2e-5)
        start += n
    separate = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    separate["pixel_values"] = separate["pixel_values"][:, None]  # one image slot group per row
    loc = (tok.first_location_id, tok.num_location_tokens)
    _, m_packed = loss_and_metrics(model, params, packed, jax.random.PRNGKey(0), True, *loc)
    _, m_separate = loss_and_metrics(model, params, separate, jax.random.PRNGKey(0), True, *loc)
    assert m_packed["tokens"] == m_separate["tokens"]
    np.testing.assert_allclose(m_packed["nll_sum"], m_separate["nll_sum"], rtol=1e-5)
    # per source: each example's own loss, summed over the examples of that source
    _, by_source = loss_and_metrics(model, params, packed, jax.random.PRNGKey(0), True, *loc, num_sources=2)
    alone = [loss_and_metrics(model, params, {k: v[i:i + 1] for k, v in separate.items()}, jax.random.PRNGKey(0),
                              True, *loc)[1] for i in range(3)]
    np.testing.assert_allclose(by_source["source_nll_sum"], [0, alone[0]["nll_sum"] + alone[2]["nll_sum"],
                                                             alone[1]["nll_sum"]], rtol=1e-5)
    assert by_source["source_tokens"].tolist() == [0, alone[0]["tokens"] + alone[2]["tokens"], alone[1]["tokens"]]


def _pipe(root, processor, tmp_path, **kw):
    (tmp_path / "lines.txt").write_text("\n".join(f"a text line about {i} circles" for i in range(40)))
    sources = [Source("shapes", "grit", data_dir=str(root / "shapes" / "grounded" / "1.0.0"), weight=3),
               Source("text", "text", path=str(tmp_path / "lines.txt"), weight=1)]
    return Pipeline(sources, processor, ExampleConfig(seq_len=96, grounded_prob=0.5), batch_size=3, seed=5,
                    shuffle_buffer=16, num_workers=2, **kw)


def _segments(batch):
    """A packed batch -> its examples' token ids, in order."""
    out = []
    for ids, seg in zip(batch["input_ids"], batch["segment_ids"]):
        out += [ids[seg == s].tolist() for s in range(1, seg.max() + 1)]
    return out


def test_packed_pipeline_holds_the_unpacked_stream_and_resumes_exactly(shapes_tfds, small_spm, tmp_path):
    processor = Kosmos2Processor(Kosmos2Tokenizer.from_file(small_spm), image_size=32, num_image_tokens=8)
    packed = _pipe(shapes_tfds, processor, tmp_path, pack=True, pack_max_images=3)
    batches = [next(packed) for _ in range(5)]
    for b in batches:
        assert b["pixel_values"].shape == (3, 3, 32, 32, 3) and b["segment_ids"].shape == (3, 96)
        assert (b["has_image"] <= 3).all() and (b["segment_ids"].max(axis=1) >= 2).all()
        assert (b["image_embeds_position_mask"].sum(axis=1) == 8 * b["has_image"]).all()
    examples = [e for b in batches for e in _segments(b)]
    plain = _pipe(shapes_tfds, processor, tmp_path)
    stream = []
    while len(stream) < len(examples):
        b = next(plain)
        stream += [ids[m == 1].tolist() for ids, m in zip(b["input_ids"], b["attention_mask"])]
    assert examples == stream[:len(examples)]  # packing reorders nothing and drops nothing
    fill_packed = np.mean([b["attention_mask"].mean() for b in batches])
    assert fill_packed > 0.7  # vs ~0.4 for one example per 96-token row

    again = _pipe(shapes_tfds, processor, tmp_path, pack=True, pack_max_images=3)
    for _ in range(2):
        next(again)
    resumed = _pipe(shapes_tfds, processor, tmp_path, pack=True, pack_max_images=3, state=again.state())
    for want in batches[2:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_input_counts_of_packed_and_unpacked_batches():
    """Real tokens / positions and real images / image slots the vision tower runs on (logged as
    the fills of each log interval)."""
    from kosmos2_jax.train.trainer import input_counts

    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int32)
    packed = {"attention_mask": mask, "pixel_values": np.zeros((2, 3, 8, 8, 3), np.float32),
              "has_image": np.array([2, 1], np.int32)}
    assert input_counts(packed).tolist() == [5, 8, 3, 6]
    unpacked = {"attention_mask": mask, "pixel_values": np.zeros((2, 8, 8, 3), np.float32),
                "has_image": np.array([1, 0], np.int32)}  # the text row still runs the vision tower
    assert input_counts(unpacked).tolist() == [5, 8, 1, 2]
    assert input_counts({"attention_mask": mask}).tolist() == [5, 8, 0, 0]


def test_plain_and_chunked_losses_are_equal_in_value_and_every_gradient(small_spm):
    """`train.loss_impl`: the plain loss (full logits, autodiff) and the chunked one (custom VJP)
    give the same loss, metrics and gradient of every parameter, on packed rows with weighted, soft
    location targets and chunks narrower than the rows' targets (several chunks and a tail)."""
    from kosmos2_jax.train.loss import location_kernel

    tok, model, params, examples, packed = _packed_examples(small_spm)
    other = pack_row(examples[::-1], packed["input_ids"].shape[1], 3, tok.pad_id)  # the second row: reversed order
    batch = {k: np.concatenate([v, other[k][None]]) for k, v in packed.items()}
    loc = (tok.first_location_id, tok.num_location_tokens)
    assert ((batch["input_ids"] >= loc[0]) & (batch["loss_mask"] > 0)).sum() >= 2  # location targets
    kernel = location_kernel(int(round(loc[1] ** 0.5)), 1.0)
    out = {}
    for impl in ("plain", "chunked"):
        out[impl] = jax.value_and_grad(
            lambda p: loss_and_metrics(model, p, batch, jax.random.PRNGKey(0), True, *loc, 2.0, loss_chunk=4,
                                       location_kernel=kernel, num_sources=2, loss_impl=impl), has_aux=True)(params)
    ((plain, m_plain), g_plain), ((chunked, m_chunked), g_chunked) = out["plain"], out["chunked"]
    np.testing.assert_allclose(plain, chunked, rtol=1e-5)
    for k in m_plain:
        np.testing.assert_allclose(m_plain[k], m_chunked[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # one tolerance for all: some gradients are 0 up to rounding (a key bias under softmax)
    atol = 1e-5 * max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(g_plain))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_plain), jax.tree_util.tree_leaves(g_chunked)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))
    assert atol > 0
