import random
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from kosmos2_jax.format.tokenizer import TAG_TOKENS, Kosmos2Tokenizer, location_token


# --- official layout ---------------------------------------------------------------------------
def test_official_vocab_and_ids(tokenizer):
    t = tokenizer
    assert t.vocab_size == 65037
    assert (t.bos_id, t.pad_id, t.eos_id, t.unk_id, t.mask_id) == (0, 1, 2, 3, 64001)
    assert (t.eod_id, t.image_id, t.end_image_id, t.eoc_id, t.eol_id) == (64002, 64003, 64004, 64005, 64006)
    assert (t.phrase_id, t.end_phrase_id, t.object_id, t.end_object_id) == (64007, 64008, 64009, 64010)
    assert (t.delimiter_id, t.grounding_id) == (64011, 64012)
    assert t.location_id(0) == 64013 and t.location_id(79) == 64092
    assert t.location_id(1016) == 65029 and t.location_id(1023) == 65036
    assert t.location_index(65036) == 1023 and t.is_location_id(64013) and not t.is_location_id(64012)
    assert [t.id_to_token(i) for i in (4, 5, 6)] == [".", "\u2581the", ","]
    assert t.token_to_id("<patch_index_0044>") == 64057


def test_reference_piece_ids(tokenizer):
    assert tokenizer.encode(" An image of") == [712, 1648, 9]
    assert tokenizer.encode("Two puppies sit in a field of grass.") == [1264, 17772, 1357, 12, 10, 770, 9, 4464, 4]
    assert tokenizer.encode("<phrase> a snowman", add_bos=True, add_eos=True) == [0, 64007, 10, 43867, 2]


def test_location_id_range(tokenizer):
    with pytest.raises(ValueError, match="1024"):
        tokenizer.location_id(1024)
    with pytest.raises(ValueError, match="-1"):
        tokenizer.location_id(-1)
    with pytest.raises(ValueError, match="65037"):
        tokenizer.id_to_token(65037)


FIXED_TEXTS = [
    "<grounding> <phrase> Two puppies </phrase> sit in a field of <phrase> grass </phrase>.",
    "<grounding>An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming",
    "  leading and trailing   spaces  ",
    "<s>literal bos and </s> eos and <pad> and <unk> and <mask> tokens",
    "text<phrase>glued</phrase>to tags <patch_index_1024> is not a token, <patch_index_044> neither",
    "<image> <image> </image> <notatag> <<phrase>> <phrase <phrase>x</phrase >",
    "unicode: caf\u00e9 na\u00efve \u3053\u3093\u306b\u3061\u306f \U0001F600 \u0663 tabs\tand\nnewlines",
    "</delimiter_of_multi_objects/></doc></chunk></line><grounding>",
    "",
    "   ",
]


def _hf_ids(hf_processor, text):
    return hf_processor.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", FIXED_TEXTS)
def test_encode_equals_hf_slow_tokenizer(tokenizer, hf_processor, text):
    assert tokenizer.encode(text) == _hf_ids(hf_processor, text)


_PIECES = list(TAG_TOKENS) + ["<s>", "</s>", "<pad>", "<unk>", "<mask>", "<patch_index_0000>",
                              "<patch_index_1023>", "<patch_index_0512>", " ", "  ", "a", " dog", "x.", "<", ">",
                              "\u00e9", "\U0001F600", "<patch_index_99>", "\n"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=6)), max_size=12))
def test_encode_equals_hf_on_random_mixtures(tokenizer, hf_processor, parts):
    text = "".join(parts)
    assert tokenizer.encode(text) == _hf_ids(hf_processor, text)


_ADDED_PIECES = list(TAG_TOKENS) + ["<s>", "</s>", "<pad>", "<unk>", "<mask>", "<patch_index_0000>",
                                    "<patch_index_1023>", "<patch_index_0512>"]
_TEXT_PIECES = [" ", "  ", "a", " dog ", "x.", ">", "\u00e9", "\U0001F600", "\n", "", " two\tcats "]


@pytest.fixture(scope="module")
def whitespace_keeping_tokenizer(tmp_path_factory):
    """A model that keeps spaces as written (the official one collapses and strips them, which
    would hide where the tag rules strip)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("ws_spm")
    (d / "lines.txt").write_text("\n".join(f"a  dog {i} and   two cats \t" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(d / "lines.txt"), model_prefix=str(d / "ws"), vocab_size=40,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, remove_extra_whitespaces=False,
                                   hard_vocab_limit=False, minloglevel=2)
    return Kosmos2Tokenizer.from_file(str(d / "ws.model"))


@pytest.mark.parametrize("which", ["official", "whitespace_keeping"])
@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.one_of(st.sampled_from(_ADDED_PIECES + _TEXT_PIECES),
                                 st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<"), max_size=6)), max_size=12))
def test_encode_pieces_equals_encode_of_stripped_join(tokenizer, whitespace_keeping_tokenizer, which, pieces):
    # Pieces are whole added tokens or text without "<" (adjacent texts included), as
    # `grounded_pieces` gives them; the ids must be those of the joined, stripped text.
    tok = tokenizer if which == "official" else whitespace_keeping_tokenizer
    assert tok.encode_pieces(pieces) == tok.encode("".join(pieces).strip())


def test_encode_pieces_rejects_a_tag_inside_text(tokenizer):
    with pytest.raises(ValueError, match="contains '<'"):
        tokenizer.encode_pieces(["a <phrase>dog"])


def test_decode_equals_hf_fast_tokenizer(tokenizer, hf_fast_tokenizer):
    rng = random.Random(0)
    special = [0, 1, 2, 3, 64001]
    for _ in range(300):
        ids = [rng.choice([rng.randrange(4, 64001), rng.randrange(64002, 65037), rng.choice(special)])
               for _ in range(rng.randrange(0, 20))]
        for skip in (True, False):
            assert tokenizer.decode(ids, skip) == hf_fast_tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_decode_reference_snowman(tokenizer):
    ids = ([0, 64003] + list(range(4, 68)) + [64004, 64012, 712, 1648, 9, 64007, 10, 43867, 64008, 64009, 64057,
           64876, 64010, 5950, 597, 32, 64007, 10, 646, 64008, 64009, 64018, 64924, 64010, 4, 2])
    text = tokenizer.decode(ids).split("</image>")[-1]
    assert text == ("<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863>"
                    "</object> warming himself by<phrase> a fire</phrase><object><patch_index_0005>"
                    "<patch_index_0911></object>.")


# --- any sentencepiece model --------------------------------------------------------------------
def test_custom_model_layout(small_spm):
    tok = Kosmos2Tokenizer.from_file(small_spm)
    n = tok.sp.get_piece_size()
    assert tok.vocab_size == n + 2 + 11 + 1024
    assert tok.mask_id == n + 1 and tok.eod_id == n + 2 and tok.grounding_id == n + 12
    assert tok.location_id(0) == n + 13 and tok.location_id(1023) == tok.vocab_size - 1
    text = "<grounding><phrase> a red circle</phrase><object><patch_index_0001><patch_index_0500></object> on grey"
    ids = tok.encode(text)
    assert ids[:2] == [tok.grounding_id, tok.phrase_id] and tok.location_id(500) in ids
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_missing_or_bad_spm_file(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(ValueError, match="nope.model"):
        Kosmos2Tokenizer.from_file(missing)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        Kosmos2Tokenizer.from_file(bad)


def test_train_cli(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(f"a photo of {i} blue squares next to a red circle" for i in range(200)))
    out = subprocess.run([sys.executable, "-m", "kosmos2_jax.tokenizer", "train", "--input", str(tmp_path / "c.txt"),
                          "--vocab_size", "60", "--out", str(tmp_path / "m" / "dom")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "KOSMOS-2 vocab" in out.stdout
    tok = Kosmos2Tokenizer.from_file(tmp_path / "m" / "dom.model")
    assert tok.decode(tok.encode("a photo of blue squares")) == "a photo of blue squares"
    bad = subprocess.run([sys.executable, "-m", "kosmos2_jax.tokenizer", "train", "--input", str(tmp_path / "x.txt"),
                          "--vocab_size", "60", "--out", str(tmp_path / "y")], capture_output=True, text=True)
    assert bad.returncode != 0 and "x.txt" in bad.stderr
    # more pieces than the text holds: trained, with the reason said
    small = subprocess.run([sys.executable, "-m", "kosmos2_jax.tokenizer", "train", "--input", str(tmp_path / "c.txt"),
                            "--vocab_size", "2000", "--out", str(tmp_path / "m" / "big")], capture_output=True, text=True)
    assert small.returncode == 0, small.stderr
    pieces = Kosmos2Tokenizer.from_file(tmp_path / "m" / "big.model").sp.get_piece_size()
    assert pieces < 2000 and f"note: {pieces} pieces, not --vocab_size 2000" in small.stdout, small.stdout


def test_location_token_format():
    assert location_token(44) == "<patch_index_0044>"
