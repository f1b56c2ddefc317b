"""KOSMOS-2 tokenizer: sentencepiece pieces plus the fairseq/HF special, tag and location tokens.

Id layout (reference §2.1), for a sentencepiece model with N pieces whose ids 0, 1, 2 are
`<unk>`, `<s>`, `</s>` (the official model has N = 64000):

    0 <s>   1 <pad>   2 </s>   3 <unk>
    i + 1             sentencepiece piece i, for 3 <= i < N
    N + 1             <mask>
    N + 2 ... N + 12  the 11 tags (</doc> <image> </image> </chunk> </line> <phrase> </phrase>
                      <object> </object> </delimiter_of_multi_objects/> <grounding>)
    N + 13 + k        <patch_index_{k:04d}>, k = 0 .. 1023

so the official model gives vocab 65037 with ids identical to Hugging Face's.

Encoding follows HF's slow `XLMRobertaTokenizer` with the processor's added tokens: text is split
on added tokens, every tag, location token and `<mask>` swallows the whitespace on its left
(`lstrip`), and each remaining piece of text goes through sentencepiece on its own.
Decoding follows HF's fast tokenizer (the form HF's docs and `post_process_generation` use):
added tokens are written as they are, `▁` becomes a space, and the first token loses one
leading space.

CLI: `python -m kosmos2_jax.tokenizer train --input captions.txt --vocab_size N --out PREFIX`
trains a sentencepiece model with the layout above for a new domain.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Iterable, Sequence

import sentencepiece as spm

from kosmos2_jax.utils.errors import UsageError

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
TAG_TOKENS = (
    "</doc>",
    "<image>",
    "</image>",
    "</chunk>",
    "</line>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<grounding>",
)
NUM_LOCATION_TOKENS = 1024
_SPIECE_UNDERLINE = "\u2581"
_TAG_LIKE = re.compile(r"<[^<>]*>")


def location_token(index: int) -> str:
    """`<patch_index_0044>` for 44."""
    return f"<patch_index_{index:04d}>"


class Kosmos2Tokenizer:
    """Text <-> ids with the official KOSMOS-2 layout. Build it with `from_file(path)`."""

    def __init__(self, sp: spm.SentencePieceProcessor, num_location_tokens: int = NUM_LOCATION_TOKENS,
                 name: str = "<sentencepiece model>"):
        _check_piece_layout(sp, name)
        self.sp = sp
        self.num_location_tokens = num_location_tokens
        n = sp.get_piece_size()
        self._num_pieces = n
        added = [MASK, *TAG_TOKENS, *(location_token(k) for k in range(num_location_tokens))]
        self._id_to_added = {0: BOS, 1: PAD, 2: EOS, 3: UNK}
        self._id_to_added.update({n + 1 + i: tok for i, tok in enumerate(added)})
        self._added_to_id = {tok: i for i, tok in self._id_to_added.items()}
        # Only <s>, <pad>, </s>, <unk> keep the whitespace before them; everything added by the
        # processor (and XLM-R's <mask>) is an lstrip token.
        self._lstrip = frozenset(added)
        self.special_ids = frozenset(self._added_to_id[t] for t in (BOS, PAD, EOS, UNK, MASK))

    @classmethod
    def from_file(cls, path: str | os.PathLike, num_location_tokens: int = NUM_LOCATION_TOKENS) -> "Kosmos2Tokenizer":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UsageError(f"sentencepiece model file not found: {path!r}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(path)
        except (OSError, RuntimeError) as e:
            raise UsageError(f"cannot load sentencepiece model {path!r}: {e}") from e
        return cls(sp, num_location_tokens, name=path)

    # --- ids of the special, tag and location tokens -------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._num_pieces + 2 + len(TAG_TOKENS) + self.num_location_tokens

    bos_id, pad_id, eos_id, unk_id = 0, 1, 2, 3

    @property
    def mask_id(self) -> int:
        return self._num_pieces + 1

    def _tag(self, tok: str) -> int:
        return self._added_to_id[tok]

    eod_id = property(lambda self: self._tag("</doc>"))
    image_id = property(lambda self: self._tag("<image>"))  # boi
    end_image_id = property(lambda self: self._tag("</image>"))  # eoi
    eoc_id = property(lambda self: self._tag("</chunk>"))
    eol_id = property(lambda self: self._tag("</line>"))
    phrase_id = property(lambda self: self._tag("<phrase>"))
    end_phrase_id = property(lambda self: self._tag("</phrase>"))
    object_id = property(lambda self: self._tag("<object>"))
    end_object_id = property(lambda self: self._tag("</object>"))
    delimiter_id = property(lambda self: self._tag("</delimiter_of_multi_objects/>"))
    grounding_id = property(lambda self: self._tag("<grounding>"))

    @property
    def first_location_id(self) -> int:
        return self._num_pieces + 2 + len(TAG_TOKENS)

    def location_id(self, index: int) -> int:
        """Id of `<patch_index_{index:04d}>`."""
        if not 0 <= index < self.num_location_tokens:
            raise UsageError(f"location index {index} outside [0, {self.num_location_tokens - 1}]")
        return self.first_location_id + int(index)

    def location_index(self, token_id: int) -> int:
        """Inverse of `location_id`; raises for a non-location id."""
        if not self.is_location_id(token_id):
            raise UsageError(f"token id {token_id} is not a location token")
        return token_id - self.first_location_id

    def is_location_id(self, token_id: int) -> bool:
        return 0 <= token_id - self.first_location_id < self.num_location_tokens

    # --- token <-> id ----------------------------------------------------------------------
    def token_to_id(self, token: str) -> int:
        if token in self._added_to_id:
            return self._added_to_id[token]
        piece = self.sp.piece_to_id(token)
        return piece + 1 if piece else self.unk_id

    def id_to_token(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._id_to_added:
            return self._id_to_added[token_id]
        if 4 <= token_id <= self._num_pieces:
            return self.sp.id_to_piece(token_id - 1)
        raise UsageError(f"token id {token_id} outside the vocabulary [0, {self.vocab_size - 1}]")

    # --- text <-> ids ----------------------------------------------------------------------
    def split_added_tokens(self, text: str) -> list[str]:
        """Text cut into added tokens and the text between them, after lstrip (as HF does)."""
        parts: list[str] = []
        pos = 0
        for m in _TAG_LIKE.finditer(text):
            tok = m.group()
            if tok not in self._added_to_id:
                continue
            before = text[pos:m.start()]
            if tok in self._lstrip:
                before = before.rstrip()
            if before:
                parts.append(before)
            parts.append(tok)
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        return parts

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of `text` (tags written in the text become their ids); no `<s>`/`</s>` unless asked."""
        if not isinstance(text, str):
            raise UsageError(f"encode expects a str, got {type(text).__name__}: {text!r}")
        ids = [self.bos_id] if add_bos else []
        for part in self.split_added_tokens(text):
            if part in self._added_to_id:
                ids.append(self._added_to_id[part])
            else:
                self._encode_text(part, False, ids)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_pieces(self, pieces: Sequence[str]) -> list[int]:
        """`encode("".join(pieces).strip())` for pieces that are each an added token or text with no
        `<` in it (so no tag can start inside), without searching the joined text for tags again."""
        ids: list[int] = []
        text: list[str] = []  # the text since the last added token
        at_start = True
        for piece in pieces:
            token_id = self._added_to_id.get(piece)
            if token_id is None:
                if "<" in piece:
                    raise UsageError(f"text piece {piece!r} contains '<': encode the joined text instead")
                text.append(piece)
                continue
            before = "".join(text)
            self._encode_text(before.lstrip() if at_start else before, piece in self._lstrip, ids)
            ids.append(token_id)
            text, at_start = [], False
        rest = "".join(text)
        self._encode_text(rest.lstrip() if at_start else rest, True, ids)
        return ids

    def _encode_text(self, text: str, rstrip: bool, ids: list[int]) -> None:
        if rstrip:
            text = text.rstrip()
        if text:
            ids.extend(p + 1 if p else self.unk_id for p in self.sp.encode(text))

    def unknown_characters(self, text: str) -> list[str]:
        """The characters of `text` (tags and location tokens aside) that the sentencepiece model
        cannot encode: they would become <unk>, which decoding drops."""
        chars = {c for part in self.split_added_tokens(text) if part not in self._added_to_id for c in part}
        return sorted(c for c in chars if not c.isspace() and 0 in self.sp.encode(c))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. `skip_special_tokens` drops <s> <pad> </s> <unk> <mask>, never tags or locations."""
        out = []
        for token_id in ids:
            token_id = int(token_id)
            if skip_special_tokens and token_id in self.special_ids:
                continue
            token = self.id_to_token(token_id)
            if token_id not in self._id_to_added:
                token = token.replace(_SPIECE_UNDERLINE, " ")
                if not out and token.startswith(" "):
                    token = token[1:]
            out.append(token)
        return "".join(out)

    def batch_decode(self, batch: Iterable[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def tokenizer_for(spm_path: str, model) -> Kosmos2Tokenizer:
    """The tokenizer with as many location tokens as the model's vocabulary leaves room for
    (1024 for the released model; a demo model may use a smaller grid). `model`: a Kosmos2 or its config."""
    vocab_size = getattr(model, "config", model).text.vocab_size
    tok = Kosmos2Tokenizer.from_file(spm_path)
    locations = vocab_size - (tok.vocab_size - tok.num_location_tokens)
    if locations != tok.num_location_tokens:
        if locations <= 0 or int(locations ** 0.5) ** 2 != locations:
            raise UsageError(f"tokenizer {spm_path!r} ({tok.vocab_size - tok.num_location_tokens} tokens before the "
                             f"location tokens) does not fit the model's vocabulary of {vocab_size}")
        tok = Kosmos2Tokenizer.from_file(spm_path, num_location_tokens=locations)
    return tok


def _check_piece_layout(sp: spm.SentencePieceProcessor, name: str) -> None:
    # The fairseq layout maps sentencepiece ids 0, 1, 2 onto <unk>, <s>, </s>; a model trained
    # with another layout would silently collide with those ids.
    if sp.get_piece_size() < 4 or sp.unk_id() != 0 or sp.bos_id() != 1 or sp.eos_id() != 2:
        raise UsageError(
            f"sentencepiece model {name} must have unk_id=0, bos_id=1, eos_id=2 (got unk={sp.unk_id()}, "
            f"bos={sp.bos_id()}, eos={sp.eos_id()}); train it with `python -m kosmos2_jax.tokenizer train`")


def train_sentencepiece(input_path: str, vocab_size: int, out_prefix: str, model_type: str = "bpe",
                        character_coverage: float = 0.9995) -> str:
    """Train a sentencepiece model with the KOSMOS-2 piece layout; returns the `.model` path."""
    if not os.path.isfile(input_path):
        raise UsageError(f"training text not found: {input_path!r}")
    if vocab_size < 8:
        raise UsageError(f"vocab_size must be at least 8, got {vocab_size}")
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{out_prefix}.partial-{os.getpid()}"  # both files appear only when training succeeded
    try:
        spm.SentencePieceTrainer.train(
            input=input_path, model_prefix=tmp, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="nmt_nfkc", hard_vocab_limit=False, minloglevel=2)
    except RuntimeError as e:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
        raise UsageError(f"sentencepiece training on {input_path!r} failed: {str(e).strip().splitlines()[-1]}") from None
    for ext in (".vocab", ".model"):
        os.replace(tmp + ext, out_prefix + ext)
    return out_prefix + ".model"
