"""Interleaved image-text documents (MMC4, OBELICS): parts, row-sized chunks, examples, the pipeline."""

import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from kosmos2_jax.data.examples import ExampleConfig, resize_pixels
from kosmos2_jax.data.interleaved import document_parts, interleaved_example, split_document
from kosmos2_jax.data.packing import pack_row
from kosmos2_jax.data.pipeline import Pipeline, Source
from kosmos2_jax.models import Kosmos2, tiny
from kosmos2_jax.format.processor import Kosmos2Processor
from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer

DUMMY = REPO / "data" / "interleaved" / "dummy_data"
IMAGES = DUMMY / "images"


@pytest.fixture(scope="module")
def processor(small_spm):
    return Kosmos2Processor(Kosmos2Tokenizer.from_file(small_spm), image_size=28, num_image_tokens=8)


def _docs(name):
    return [json.loads(line) for line in (DUMMY / name).read_text().splitlines()]


def test_three_images_become_three_blocks_at_their_places(processor):
    """MMC4's first dummy document: an image before sentences 0, 1 and 3. The row is `<s>` img s0
    img s1 s2 img s3 `</s>`; the image mask is on exactly the 3 x 8 slots, the loss on the text and
    `</s>` only, and the pixels are the three images in order."""
    doc = _docs("mmc4_docs.jsonl")[0]
    parts = document_parts(doc)
    assert [k for k, _ in parts] == ["image", "text", "image", "text", "text", "image", "text"]
    [chunk] = split_document(parts, processor, seq_len=160, max_images=3)
    ex = interleaved_example(chunk, str(IMAGES), processor, ExampleConfig(seq_len=160))
    tok = processor.tokenizer
    block = [tok.image_id, *processor.image_slot_ids, tok.end_image_id]
    sentences = [tok.encode(s) for s in doc["text_list"]]
    expected = ([tok.bos_id] + block + sentences[0] + block + sentences[1] + sentences[2] + block + sentences[3]
                + [tok.eos_id])
    n = len(expected)
    assert ex["input_ids"][:n].tolist() == expected and (ex["input_ids"][n:] == tok.pad_id).all()
    assert ex["attention_mask"].sum() == n
    slots = ex["image_embeds_position_mask"]
    assert slots.sum() == 24 and set(np.asarray(expected)[slots[:n] == 1]) <= set(processor.image_slot_ids)
    text = set(i for s in sentences for i in s) | {tok.eos_id}
    on_loss = np.asarray(expected)[ex["loss_mask"][:n] == 1]
    assert ex["loss_mask"].sum() == sum(map(len, sentences)) + 1 and set(on_loss) <= text
    assert not (ex["loss_mask"] * slots).any()
    assert ex["has_image"] == 3 and ex["pixel_values"].shape == (3, 28, 28, 3)
    for k, info in enumerate(doc["image_info"]):
        want = resize_pixels(Image.open(IMAGES / info["image_name"]).convert("RGB"), 28, "square")
        np.testing.assert_array_equal(ex["pixel_values"][k], want)


def test_the_row_computes_what_the_images_features_give_in_order(processor):
    """The model's forward on the packed row equals the forward with the embeddings of
    `Kosmos2.image_features` of the same three images, in that order, written into the slots."""
    [chunk] = split_document(document_parts(_docs("mmc4_docs.jsonl")[0]), processor, 160, 3)
    ex = interleaved_example(chunk, str(IMAGES), processor, ExampleConfig(seq_len=160))
    row = {k: v[None] for k, v in pack_row([ex], 160, 3, processor.tokenizer.pad_id).items()}
    model = Kosmos2(tiny(vocab_size=processor.tokenizer.vocab_size))
    pixels = (row["pixel_values"].astype(np.float32) / 255.0 - 0.45) / 0.27
    params = model.init(jax.random.PRNGKey(0), pixels, row["input_ids"], None, row["image_embeds_position_mask"])["params"]
    logits = model.apply({"params": params}, pixels, row["input_ids"], row["attention_mask"],
                         row["image_embeds_position_mask"], segment_ids=row["segment_ids"])
    feats = model.apply({"params": params}, pixels[0], method=Kosmos2.image_features)  # [3, Q, D]
    embeds = feats.reshape(1, -1, feats.shape[-1])
    alone = model.apply({"params": params}, None, row["input_ids"], row["attention_mask"],
                        row["image_embeds_position_mask"], image_embeds=embeds)
    n = int(ex["attention_mask"].sum())  # (padding positions differ: a packed row masks them apart)
    np.testing.assert_allclose(logits[:, :n], alone[:, :n], atol=2e-5)
    swapped = feats[::-1].reshape(1, -1, feats.shape[-1])  # the order matters
    other = model.apply({"params": params}, None, row["input_ids"], row["attention_mask"],
                        row["image_embeds_position_mask"], image_embeds=swapped)
    assert np.abs(np.asarray(other[:, :n]) - np.asarray(logits[:, :n])).max() > 1e-3


def test_obelics_layout_reads_as_the_same_parts(processor):
    """OBELICS' texts/images lists (nulls where the other is) give the parts MMC4's layout gives for
    the same page, paragraphs split into sentences."""
    [obelics] = _docs("obelics_docs.jsonl")
    mmc4 = {"text_list": ["Two circles, one red and one blue.", "The red one is on the left.", "That is all."],
            "image_info": [{"image_name": "red_circle.png", "matched_text_index": 2},
                           {"image_name": "blue_circle.png", "matched_text_index": 2}]}
    assert document_parts(obelics) == document_parts(mmc4)


def test_long_documents_split_at_sentence_and_image_boundaries(processor):
    """Chunks fit the row and `max_images`; every text token appears once, in order; only the
    last chunk ends the document; a sentence longer than a row is cut into row-sized pieces."""
    tok = processor.tokenizer
    sentences = [f"sentence {i} is about a red circle and a blue square." for i in range(12)]
    sentences[5] = " ".join(["a green triangle"] * 40)  # longer than a row
    doc = {"text_list": sentences, "image_info": [{"image_name": "red_circle.png", "matched_text_index": i}
                                                  for i in (0, 1, 2, 3, 4, 8)]}
    seq_len, max_images = 48, 2
    chunks = split_document(document_parts(doc), processor, seq_len, max_images)
    assert len(chunks) > 3 and [c["last"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    text_ids = []
    for c in chunks:
        images = sum(kind == "image" for kind, _ in c["parts"])
        ex = interleaved_example(c, str(IMAGES), processor, ExampleConfig(seq_len=seq_len))
        assert images <= max_images and ex["has_image"] == images and ex["attention_mask"].sum() <= seq_len
        assert (ex["input_ids"][int(ex["attention_mask"].sum()) - 1] == tok.eos_id) == c["last"]
        text_ids += [i for kind, ids in c["parts"] if kind == "text" for i in ids]
    assert text_ids == [i for s in sentences for i in tok.encode(s)]
    lengths = [len(tok.encode(s)) for s in sentences]
    sentence_starts = {sum(lengths[:k]) for k in range(len(sentences))}
    long_sentence = range(sum(lengths[:5]) + 1, sum(lengths[:6]))
    pos = 0
    for c in chunks:  # each chunk starts at a sentence, or inside the sentence longer than a row
        assert pos in sentence_starts or pos in long_sentence, pos
        pos += sum(len(ids) for kind, ids in c["parts"] if kind == "text")


def _bad_documents(tmp_path):
    images = tmp_path / "images"
    shutil.copytree(IMAGES, images)
    (images / "broken.png").write_bytes(b"not a png")
    good = _docs("mmc4_docs.jsonl")
    bad = [{"text_list": ["A picture that is not there."], "image_info": [{"image_name": "gone.png", "matched_text_index": 0}]},
           {"text_list": ["A picture that does not decode."], "image_info": [{"image_name": "broken.png", "matched_text_index": 0}]},
           {"texts": [None, None], "images": ["red_circle.png", "blue_circle.png"]},  # no text
           {"pages": []}]  # neither layout
    lines = [json.dumps(d) for d in good + bad] + ["{not json"]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "docs.jsonl", images


def test_bad_documents_are_skipped_and_counted_by_reason(processor, tmp_path):
    docs, images = _bad_documents(tmp_path)
    source = Source("web", "interleaved", path=str(docs), data_dir=str(images))
    pipe = Pipeline([source], processor, ExampleConfig(seq_len=96), batch_size=2, seed=0, num_workers=1,
                    pack=True, pack_max_images=3, repeat=False, max_bad_fraction=1.0)
    batches = list(pipe)
    pipe.close()
    assert sum(int(b["has_image"].sum()) for b in batches) == 3 + 1  # the good documents' images
    reasons = {k.split(": ", 1)[1] for k in pipe.bad_by_source}
    assert reasons == {"missing image", "undecodable image", "document with no text", "unknown document layout",
                       "bad json"}, pipe.bad_by_source
    assert all(k.startswith("web: ") for k in pipe.bad_by_source)


def test_interleaved_sources_need_packed_rows(processor):
    source = Source("web", "interleaved", path=str(DUMMY / "mmc4_docs.jsonl"), data_dir=str(IMAGES))
    with pytest.raises(ValueError, match="packed rows"):
        Pipeline([source], processor, ExampleConfig(seq_len=96), batch_size=2)


def test_a_mixture_with_documents_resumes_exactly(processor, shapes_tfds, tmp_path):
    """Documents (both layouts, a folder of JSONL files) mixed with GRIT records, packed: resuming
    at batch 3 gives the uninterrupted run's batches 3-5."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("mmc4_docs.jsonl", "obelics_docs.jsonl"):
        shutil.copy(DUMMY / name, folder / name)
    sources = [Source("web", "interleaved", path=str(folder), data_dir=str(IMAGES), weight=1),
               Source("train", "grit", data_dir=str(shapes_tfds / "shapes" / "grounded" / "1.0.0"), weight=1)]
    make = lambda state=None: Pipeline(sources, processor, ExampleConfig(seq_len=96), batch_size=2, seed=4,
                                       num_workers=2, shuffle_buffer=8, pack=True, pack_max_images=4, state=state)
    whole = make()
    batches = [next(whole) for _ in range(6)]
    whole.close()
    assert any((b["source_ids"] == 1).any() for b in batches) and any((b["source_ids"] == 2).any() for b in batches)
    first = make()
    for _ in range(3):
        next(first)
    resumed = make(first.state())
    first.close()
    for expected in batches[3:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    resumed.close()
