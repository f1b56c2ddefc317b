import numpy as np
import pytest
from PIL import Image

from conftest import IMAGES_DIR
from kosmos2_jax.format.processor import Kosmos2Processor, encode_grounded_caption, load_image, preprocess_image

WORKED_EXAMPLE = [0, 64012, 64007, 1264, 17772, 64008, 64009, 64092, 65029, 64011, 64148, 65021, 64010, 1357, 12, 10,
                  770, 9, 64007, 4464, 64008, 64009, 64493, 65036, 64010, 106, 4]
SNOWMAN_PROMPT = [0, 64003] + list(range(4, 68)) + [64004, 64012, 712, 1648, 9]


def _image(seed, size=(64, 48)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_reference_worked_example(processor):
    out = processor("<grounding> <phrase> Two puppies </phrase> sit in a field of <phrase> grass </phrase>.",
                    bboxes=[[(79, 1016), (135, 1008)], (480, 1023)])
    assert out["input_ids"][0].tolist() == WORKED_EXAMPLE
    assert out["attention_mask"].tolist() == [[1] * len(WORKED_EXAMPLE)]


def test_reference_snowman_prompt(processor):
    out = processor("<grounding>An image of", images=_image(0))
    assert out["input_ids"][0].tolist() == SNOWMAN_PROMPT
    assert out["image_embeds_position_mask"][0].tolist() == [0, 0] + [1] * 64 + [0] * 5
    assert out["pixel_values"].shape == (1, 224, 224, 3) and out["pixel_values"].dtype == np.float32


P2 = "<grounding> <phrase> Two puppies </phrase> sit in a field of <phrase> grass </phrase>."
P1 = "<grounding>The<phrase> dog</phrase> is running"
P0 = "<grounding>An image of"
# (text, with_images, bboxes, add_eos_token, padding_side)
CASES = [
    (P0, False, None, False, "right"),
    (P0, True, None, False, "right"),
    (P0, True, None, True, "right"),
    ("An image of", True, None, False, "right"),
    ("  Question: what is this? Answer:  ", True, None, True, "right"),
    (P1, True, [(0.1, 0.2, 0.5, 0.9)], False, "right"),
    (P1, False, [(0.1, 0.2, 0.5, 0.9)], True, "right"),
    (P1, True, [[(0.1, 0.2, 0.5, 0.9), (0.5, 0.5, 1.0, 1.0)]], False, "right"),
    (P1, True, [(12, 900)], False, "right"),
    (P1, True, [[(12, 900), (0.0, 0.0, 0.25, 0.25)]], False, "right"),
    (P1, True, [None], False, "right"),
    (P1, True, [[]], False, "right"),
    (P2, True, [[(79, 1016), (135, 1008)], (480, 1023)], False, "right"),
    (P2, True, [None, (0.25, 0.25, 0.5, 0.5)], True, "right"),
    (P2, False, [[(79, 1016), (135, 1008)], (480, 1023)], False, "right"),
    ("<grounding><phrase>It</phrase><object><patch_index_0044><patch_index_0863></object> is", True, None, False, "right"),
    ("<phrase>It</phrase> is", True, [(0.390625, 0.046875, 0.984375, 0.828125)], False, "right"),
    ([P0, P1, P2], True, None, False, "right"),
    ([P0, P1, P2], True, None, False, "left"),
    ([P0, P1, P2], True, None, True, "left"),
    ([P2, P1], True, [[[(79, 1016), (135, 1008)], (480, 1023)], [(0.1, 0.2, 0.5, 0.9)]], False, "right"),
    ([P2, P1], True, [[[(79, 1016), (135, 1008)], (480, 1023)], [(0.1, 0.2, 0.5, 0.9)]], True, "left"),
    ([P1, "a much longer prompt about a red circle left of two blue squares"], False, [[(3, 40)], None], False, "right"),
    ([P1, "a much longer prompt about a red circle left of two blue squares"], False, None, True, "left"),
    (["same length", "same length"], True, None, False, "left"),
]


@pytest.mark.parametrize("text, with_images, bboxes, add_eos, side", CASES)
def test_ids_and_masks_equal_hf(processor, hf_processor, text, with_images, bboxes, add_eos, side):
    batched = isinstance(text, list)
    n = len(text) if batched else 1
    images = [_image(i) for i in range(n)] if with_images else None
    if images is not None and not batched:
        images = images[0]
    ours = processor(text, images=images, bboxes=bboxes, add_eos_token=add_eos, padding_side=side)
    hf_tok = hf_processor.tokenizer
    old_side, hf_tok.padding_side = hf_tok.padding_side, side
    try:
        hf = hf_processor(text=text, images=images, bboxes=bboxes, add_eos_token=add_eos,
                          padding=batched and images is None)
    finally:
        hf_tok.padding_side = old_side
    as_rows = (lambda x: x) if batched else (lambda x: [x])
    assert ours["input_ids"].tolist() == as_rows(hf["input_ids"])
    assert ours["attention_mask"].tolist() == as_rows(hf["attention_mask"])
    if with_images:
        assert ours["image_embeds_position_mask"].tolist() == as_rows(hf["image_embeds_position_mask"])
        assert ours["image_embeds_position_mask"].sum(axis=1).tolist() == [64] * n
    else:
        assert not ours["image_embeds_position_mask"].any()
        assert "pixel_values" not in ours


DEMO_IMAGES = sorted(IMAGES_DIR.glob("*")) if IMAGES_DIR.is_dir() else []


@pytest.mark.skipif(not DEMO_IMAGES, reason=f"demo images not found in {IMAGES_DIR}")
@pytest.mark.parametrize("path", DEMO_IMAGES, ids=lambda p: p.name)
def test_pixel_values_equal_hf_on_demo_images(hf_processor, path):
    image = Image.open(path)
    hf = hf_processor.image_processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = preprocess_image(image)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    assert np.abs(ours - hf).max() <= 1e-5
    np.testing.assert_array_equal(preprocess_image(str(path)), preprocess_image(load_image(path)))


def test_pixel_values_equal_hf_on_odd_images(hf_processor):
    images = [_image(1, (500, 37)), Image.fromarray(np.full((30, 30, 4), 200, np.uint8)),
              Image.fromarray(np.arange(900, dtype=np.uint8).reshape(30, 30)).convert("L")]
    for image in images:
        hf = hf_processor.image_processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        assert np.abs(preprocess_image(image) - hf).max() <= 1e-5
    arr = np.asarray(images[0])
    np.testing.assert_array_equal(preprocess_image(arr), preprocess_image(images[0]))


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bboxes, message", [
    ([(0.1, 0.1, 0.2, 0.2), (0.3, 0.3, 0.4, 0.4)], "2 box entries for 1"),
    ([(0.5, 0.1, 0.2, 0.2)], r"\(0.5, 0.1, 0.2, 0.2\)"),
    ([(0.1, 0.1, 0.2, float("nan"))], "NaN"),
    ([(0.1, 0.1, 1.2, 0.2)], "outside"),
    ([(3, 1024)], "1024"),
    ([(1, 0.2)], r"\(1, 0.2\)"),
    ((0.1, 0.1, 0.2, 0.2), "must be None or a list"),
])
def test_bad_boxes(processor, bboxes, message):
    with pytest.raises(ValueError, match=message):
        processor("<phrase>a dog</phrase> runs", bboxes=bboxes)


def test_bad_images(processor, tmp_path):
    with pytest.raises(ValueError, match="missing.png"):
        processor("x", images=str(tmp_path / "missing.png"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        processor("x", images=str(broken))
    with pytest.raises(ValueError, match="2 texts but 1 images"):
        processor(["a", "b"], images=[_image(0)])
    with pytest.raises(ValueError, match="float32"):
        processor("x", images=np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="padding_side"):
        processor("x", padding_side="middle")


def test_interleaved_prompts(processor):
    image, other = _image(0), _image(1)
    text = "<grounding><phrase> a dog</phrase>"
    single = processor([text, text], images=[image, image], bboxes=[[(3, 40)], [(3, 40)]], padding_side="left")
    inter = processor.interleaved([[image, (text, [(3, 40)])]] * 2)
    for k in ("input_ids", "attention_mask", "image_embeds_position_mask"):
        np.testing.assert_array_equal(inter[k], single[k])
    np.testing.assert_array_equal(inter["pixel_values"][:, 0], single["pixel_values"])

    two = processor.interleaved([[image, "<phrase> It</phrase> is a dog.", other, "<phrase> It</phrase> is"],
                                 [other, "a cat", image, "a"]])
    assert two["pixel_values"].shape == (2, 2, 224, 224, 3)
    np.testing.assert_array_equal(two["pixel_values"][0, 1], two["pixel_values"][1, 0])
    q = processor.num_image_tokens
    assert (two["image_embeds_position_mask"].sum(axis=1) == 2 * q).all()
    row = two["input_ids"][0].tolist()
    tok = processor.tokenizer
    assert row[0] == tok.bos_id and row.count(tok.image_id) == 2 and row.count(tok.end_image_id) == 2
    assert row.count(tok.bos_id) == 1  # one <s> for the whole interleaved sequence
    second_image = [i for i, t in enumerate(row) if t == tok.image_id][1]
    assert two["image_embeds_position_mask"][0, second_image + 1:second_image + 1 + q].all()
    with pytest.raises(ValueError, match="same number"):
        processor.interleaved([[image, "a"], [image, "b", other]])
    with pytest.raises(ValueError, match="bad interleaved part"):
        processor.interleaved([[image, 3]])


# --- grounded training sequences ----------------------------------------------------------------
def test_grounded_caption_sequence_matches_hf_prompt(processor, hf_processor):
    caption = "a dog next to a cat"
    box_dog, box_cat = (0.1, 0.2, 0.45, 0.9), (0.5, 0.4, 0.95, 0.8)
    seq = encode_grounded_caption(processor, caption, [(0, 5, [box_dog]), (14, 19, [box_cat])], box_formula="hf")
    hf = hf_processor(text="<grounding><phrase>a dog</phrase> next to <phrase>a cat</phrase>", images=_image(0),
                      bboxes=[box_dog, box_cat], add_eos_token=True)
    assert seq.input_ids.tolist() == hf["input_ids"]
    assert seq.image_embeds_position_mask.tolist() == hf["image_embeds_position_mask"]
    tok = processor.tokenizer
    ids, loss = seq.input_ids.tolist(), seq.loss_mask.tolist()
    first_text = ids.index(tok.end_image_id) + 1
    assert ids[first_text] == tok.grounding_id and ids[-1] == tok.eos_id
    assert loss == [0] * first_text + [1] * (len(ids) - first_text)


@pytest.mark.parametrize("caption, phrases", [
    ("  a dog  next to   a cat  ", [("a dog", 1), ("a cat", 1)]),
    ("two dogs on grass", [("two dogs", 2)]),
    ("a cat", [("a cat", 3)]),
    ("a <b>dog</b> and a cat", [("a cat", 1)]),  # "<" in the caption: the tags are found in the text
])
def test_grounded_sequence_matches_hf_prompt_on_odd_captions(processor, hf_processor, caption, phrases):
    boxes = [(0.1, 0.2, 0.45, 0.9), (0.5, 0.4, 0.95, 0.8), (0.0, 0.0, 1.0, 1.0)]
    spans, text, pos = [], "<grounding>", 0
    for phrase, n in phrases:
        start = caption.index(phrase)
        spans.append((start, start + len(phrase), boxes[:n]))
        text += caption[pos:start] + f"<phrase>{phrase}</phrase>"
        pos = start + len(phrase)
    text += caption[pos:]
    seq = encode_grounded_caption(processor, caption, spans, box_formula="hf")
    hf = hf_processor(text=text, images=_image(0), bboxes=[list(b) for _, _, b in spans], add_eos_token=True)
    assert seq.input_ids.tolist() == hf["input_ids"]
    assert seq.image_embeds_position_mask.tolist() == hf["image_embeds_position_mask"]


def test_plain_caption_sequence(processor):
    seq = encode_grounded_caption(processor, "a dog next to a cat", [(0, 5, [(0.1, 0.2, 0.45, 0.9)])], grounded=False)
    assert processor.tokenizer.grounding_id not in seq.input_ids and processor.tokenizer.phrase_id not in seq.input_ids
    assert seq.loss_mask.sum() == len(seq.input_ids) - 67
    text_only = encode_grounded_caption(processor, "a dog", [(0, 5, [(0.1, 0.2, 0.45, 0.9)])], with_image=False)
    assert text_only.loss_mask.tolist() == [0] + [1] * (len(text_only.input_ids) - 1)
    assert not text_only.image_embeds_position_mask.any()


def test_train_formula_is_default_for_records(processor):
    seq = encode_grounded_caption(processor, "a dog", [(0, 5, [(0.25, 0.25, 0.5, 0.5)])], with_image=False)
    tok = processor.tokenizer
    assert tok.location_id(528) in seq.input_ids.tolist()  # "hf" would give 495


def test_processor_on_custom_tokenizer(small_spm):
    from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer

    tok = Kosmos2Tokenizer.from_file(small_spm)
    proc = Kosmos2Processor(tok)
    out = proc("<grounding><phrase>a red circle</phrase> on grey", images=_image(3), bboxes=[(0.1, 0.1, 0.3, 0.3)])
    ids = out["input_ids"][0].tolist()
    assert ids[:2] == [0, tok.image_id] and ids[65:68] == [67, tok.end_image_id, tok.grounding_id]
    assert proc.post_process_generation(proc.decode(ids))[1][0][0] == "a red circle"
