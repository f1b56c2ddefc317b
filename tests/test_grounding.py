import random

import pytest
from hypothesis import given, settings, strategies as st

from kosmos2_jax.format import grounding
from kosmos2_jax.format.grounding import box_to_patch_pair, patch_pair_to_box, post_process_generation

SNOWMAN_RAW = ("<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
               " warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.")


# --- box <-> cells ------------------------------------------------------------------------------
def test_reference_pairs():
    assert patch_pair_to_box(44, 863) == (0.390625, 0.046875, 0.984375, 0.828125)
    assert box_to_patch_pair((0.390625, 0.046875, 0.984375, 0.828125)) == (44, 863)


def test_grid_line_case_differs_between_formulas():
    box = (0.25, 0.25, 0.5, 0.5)
    assert box_to_patch_pair(box, formula="hf") == (264, 495)
    assert box_to_patch_pair(box, formula="train") == (264, 528)
    off_grid = (0.26, 0.26, 0.51, 0.52)
    assert box_to_patch_pair(off_grid, formula="hf") == box_to_patch_pair(off_grid, formula="train")


def test_full_image_box():
    assert box_to_patch_pair((0.0, 0.0, 1.0, 1.0), formula="hf") == (0, 1023)
    assert box_to_patch_pair((0.0, 0.0, 1.0, 1.0), formula="train") == (0, 1023)
    assert patch_pair_to_box(0, 1023) == (1 / 64, 1 / 64, 1 - 1 / 64, 1 - 1 / 64)


def test_same_cell_row_column_use_cell_extents():
    assert patch_pair_to_box(33, 33) == (1 / 32, 1 / 32, 2 / 32, 2 / 32)
    assert patch_pair_to_box(32, 40) == (0.0, 1 / 32, 9 / 32, 2 / 32)  # same row
    assert patch_pair_to_box(1, 65) == (1 / 32, 0.0, 2 / 32, 3 / 32)  # same column


def test_hf_formula_equals_transformers():
    processing = pytest.importorskip("transformers.models.kosmos2.processing_kosmos2")
    rng = random.Random(0)
    for _ in range(2000):
        x1, x2 = sorted(rng.choice([rng.random(), rng.randrange(33) / 32]) for _ in range(2))
        y1, y2 = sorted(rng.choice([rng.random(), rng.randrange(33) / 32]) for _ in range(2))
        if x1 == x2 or y1 == y2:
            continue
        assert box_to_patch_pair((x1, y1, x2, y2)) == processing.coordinate_to_patch_index((x1, y1, x2, y2), 32)
        ul, lr = rng.randrange(1024), rng.randrange(1024)
        assert patch_pair_to_box(ul, lr) == processing.patch_index_to_coordinate(ul, lr, 32)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 31), st.integers(0, 31), st.integers(0, 31), st.integers(0, 31), st.sampled_from(["hf", "train"]))
def test_cell_round_trip(c1, r1, c2, r2, formula):
    """Cells -> box -> cells is exact with the HF formula; with the training formula only for boxes
    decoded from cell centres (cell-extent boxes end on a grid line, the case where they differ)."""
    (c1, c2), (r1, r2) = sorted((c1, c2)), sorted((r1, r2))
    ul, lr = r1 * 32 + c1, r2 * 32 + c2
    round_trip = box_to_patch_pair(patch_pair_to_box(ul, lr), formula=formula)
    if formula == "hf" or (c1 != c2 and r1 != r2):
        assert round_trip == (ul, lr)
    else:
        # the box's right/bottom edge sits on the next grid line, which the training formula
        # assigns to the next cell (except at the image border)
        assert round_trip == (ul, min(r2 + 1, 31) * 32 + min(c2 + 1, 31))


@settings(max_examples=500, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))
def test_box_round_trip_is_within_a_cell(a, b, c, d):
    x1, x2 = sorted((a, c))
    y1, y2 = sorted((b, d))
    if x2 - x1 < 1e-6 or y2 - y1 < 1e-6:
        return
    box = patch_pair_to_box(*box_to_patch_pair((x1, y1, x2, y2)))
    assert all(abs(p - q) <= 1 / 32 + 1e-9 for p, q in zip(box, (x1, y1, x2, y2)))


@pytest.mark.parametrize("box, message", [
    ((0.5, 0.1, 0.5, 0.2), "x1 < x2"),
    ((0.6, 0.1, 0.5, 0.2), "x1 < x2"),
    ((0.1, 0.3, 0.5, 0.2), "y1 < y2"),
    ((-0.1, 0.1, 0.5, 0.2), "outside"),
    ((0.1, 0.1, 1.5, 0.2), "outside"),
    ((float("nan"), 0.1, 0.5, 0.2), "NaN"),
    ((0.1, 0.2), "4 numbers"),
])
def test_bad_boxes_raise(box, message):
    for formula in ("hf", "train"):
        with pytest.raises(ValueError, match=message) as err:
            box_to_patch_pair(box, formula=formula)
        assert repr(box) in str(err.value) or str(box[0]) in str(err.value)


def test_bad_index_and_formula_raise():
    with pytest.raises(ValueError, match="1024"):
        patch_pair_to_box(0, 1024)
    with pytest.raises(ValueError, match="-3"):
        patch_pair_to_box(-3, 10)
    with pytest.raises(ValueError, match="'yolo'"):
        box_to_patch_pair((0.1, 0.1, 0.2, 0.2), formula="yolo")


# --- grounded captions --------------------------------------------------------------------------
def test_grounded_caption_inserts_tags_and_merges_boxes():
    caption = "a dog next to a cat"
    spans = [(14, 19, [(0.5, 0.5, 1.0, 1.0)]), (0, 5, [(0.0, 0.0, 0.25, 0.25)]), (0, 5, [(0.25, 0.25, 0.5, 0.5)])]
    text = grounding.grounded_caption(caption, spans, formula="train")
    assert text == ("<grounding><phrase>a dog</phrase><object><patch_index_0000><patch_index_0264>"
                    "</delimiter_of_multi_objects/><patch_index_0264><patch_index_0528></object> next to "
                    "<phrase>a cat</phrase><object><patch_index_0528><patch_index_1023></object>")
    clean, entities = post_process_generation(text)
    assert clean == caption
    assert [(name, span) for name, span, _ in entities] == [("a dog", (0, 5)), ("a cat", (14, 19))]


@pytest.mark.parametrize("spans, message", [
    ([(0, 5, [(0.1, 0.1, 0.2, 0.2)]), (3, 8, [(0.1, 0.1, 0.2, 0.2)])], "overlap"),
    ([(0, 50, [(0.1, 0.1, 0.2, 0.2)])], "character range"),
    ([(4, 4, [(0.1, 0.1, 0.2, 0.2)])], "character range"),
    ([(0, 5, [])], "no box"),
    ([(0, 5, [(0.3, 0.1, 0.2, 0.2)])], "x1 < x2"),
])
def test_grounded_caption_errors(spans, message):
    with pytest.raises(ValueError, match=message):
        grounding.grounded_caption("a dog next to a cat", spans)


# --- post-processing: equal to HF ---------------------------------------------------------------
def test_reference_post_process():
    assert grounding.extract_entities_with_patch_indices(SNOWMAN_RAW) == [
        (" a snowman", (31, 41), [(44, 863)]), (" a fire", (130, 137), [(5, 911)])]
    clean, entities = post_process_generation(SNOWMAN_RAW)
    assert clean == "An image of a snowman warming himself by a fire."
    assert entities == [("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)]),
                        ("a fire", (41, 47), [(0.171875, 0.015625, 0.484375, 0.890625)])]
    assert post_process_generation("<image>x</image>" + SNOWMAN_RAW, cleanup_and_extract=False) == SNOWMAN_RAW


def _hf_post_process():
    processing = pytest.importorskip("transformers.models.kosmos2.processing_kosmos2")

    def run(text):
        caption = text.split("</image>")[-1]
        return processing.clean_text_and_extract_entities_with_bboxes(caption)
    return run


HAND_CASES = [
    SNOWMAN_RAW,
    "<object><patch_index_0001><patch_index_0002></delimiter_of_multi_objects/><patch_index_0003><patch_index_0900></object> hi",
    "<phrase>two dogs</phrase><object><patch_index_0010><patch_index_0500></delimiter_of_multi_objects/>"
    "<patch_index_0600><patch_index_1000></object>",
    "<phrase> unclosed <object><patch_index_0010><patch_index_0500></object>",
    "<phrase>truncated</phrase><object><patch_index_0010>",
    "<phrase>a</phrase><object></object>",
    "<phrase>  spaced  </phrase><object><patch_index_0500><patch_index_0010></object>  tail  ",
    "<image>junk</image><image>more</image><grounding> x<phrase>y</phrase><object><patch_index_5000><patch_index_7></object>",
    "",
    "   ",
    "no tags at all",
    "<phrase></phrase><object><patch_index_0001><patch_index_0002></object>",
]


@pytest.mark.parametrize("text", HAND_CASES)
def test_post_process_equals_hf_on_hand_cases(text):
    assert post_process_generation(text) == _hf_post_process()(text)


_TOKENS = ["<phrase>", "</phrase>", "<object>", "</object>", "</delimiter_of_multi_objects/>", "<grounding>",
           "<image>", "</image>", "<s>", "</s>", " a dog", " the", " ", "  ", "red", ".", ",", "<", ">", "\u00e9"]


def _random_generation(rng):
    """Random mixtures of text, tags, location tokens; well-formed entities, malformed and truncated ones."""
    parts = []
    for _ in range(rng.randrange(0, 12)):
        kind = rng.random()
        if kind < 0.35:
            pairs = [f"<patch_index_{rng.randrange(1024):04d}><patch_index_{rng.randrange(1024):04d}>"
                     for _ in range(rng.randrange(1, 4))]
            phrase = rng.choice(["", f"<phrase>{rng.choice([' a dog', 'cat ', ' two  birds ', 'x'])}</phrase>"])
            entity = phrase + "<object>" + "</delimiter_of_multi_objects/>".join(pairs) + "</object>"
            if rng.random() < 0.3:  # truncate or corrupt
                cut = rng.randrange(len(entity))
                entity = entity[:cut] if rng.random() < 0.5 else entity[:cut] + rng.choice(_TOKENS) + entity[cut:]
            parts.append(entity)
        elif kind < 0.5:
            parts.append(f"<patch_index_{rng.randrange(1024):04d}>")
        else:
            parts.append(rng.choice(_TOKENS))
    return "".join(parts)


def test_post_process_equals_hf_on_generated_strings():
    hf = _hf_post_process()
    rng = random.Random(1234)
    with_entities = 0
    for _ in range(1000):
        text = _random_generation(rng)
        ours = post_process_generation(text)
        assert ours == hf(text), text
        with_entities += bool(ours[1])
    assert with_entities > 300  # the generator exercises the entity path, not only junk


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_TOKENS + ["<patch_index_0044>", "<patch_index_12>"]), st.text(max_size=5)),
                max_size=15))
def test_post_process_never_raises_and_equals_hf(parts):
    text = "".join(parts)
    assert post_process_generation(text) == _hf_post_process()(text)


def test_post_process_ids(tokenizer):
    # reference §1.10: the released model's output for the snowman image
    ids = ([0, 64003] + list(range(4, 68)) + [64004, 64012, 712, 1648, 9, 64007, 10, 43867, 64008, 64009, 64057,
           64876, 64010, 5950, 597, 32, 64007, 10, 646, 64008, 64009, 64018, 64924, 64010, 4, 2])
    assert grounding.post_process_ids(ids, tokenizer) == post_process_generation(SNOWMAN_RAW)
