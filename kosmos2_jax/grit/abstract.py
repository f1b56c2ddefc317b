"""The abstract-noun filter: noun chunks that name nothing a detector could box.

The paper only gives "time", "love", "freedom" as examples and never published its list, so this
one is ours. A chunk is dropped when its head (the chunk's root token)
- is a pronoun ("it", "that", "we", "someone") -- no referent inside the phrase to box;
- is a number or a date / time / money / percent / quantity / ordinal / cardinal entity
  ("2019", "ten dollars", "the morning") -- not visual objects;
- has a lemma in ABSTRACT_LEMMAS: feelings and qualities ("love", "beauty"), time words ("time",
  "day", "moment"), ideas and events ("concept", "history"), measure and quantity heads
  ("lot", "variety", "number", "part" -- "a lot of people" is dropped; "people" stays), and
  stock-photo words that name the picture, not something in it ("image", "photo",
  "illustration", "background", "view").
Pass your own `lemmas` / `entity_labels` to `is_abstract` (or `--abstract_lemmas FILE` to the
build CLI, one lemma per line) to change it for another domain.
"""

from __future__ import annotations

ABSTRACT_LEMMAS = frozenset("""
time times moment day night year month week hour minute second age era century decade season future past
present today tomorrow yesterday weekend morning afternoon evening midnight noon
love hate freedom peace happiness joy fun beauty life death truth fear hope faith luck success
idea concept thought mind memory dream knowledge information experience opinion reason way
kind sort type style quality nature fashion theme mood feeling emotion spirit energy
history culture tradition religion politics economy business industry science
lot lots number variety range couple bunch series set amount plenty majority part side half
deal piece bit kinds types birthday holiday vacation
stock image photo photograph picture illustration vector clipart rendering render graphic view
background concept close closeup shot footage scene vision
word words thing things something nothing anything everything stuff
fact case problem issue question answer example way process system method solution
""".split())

# spaCy NER labels of heads that are not visible objects.
ABSTRACT_ENTITY_LABELS = frozenset({"DATE", "TIME", "MONEY", "PERCENT", "QUANTITY", "ORDINAL", "CARDINAL"})


def load_lemmas(path: str) -> frozenset:
    """One lemma per line; '#' starts a comment."""
    with open(path) as f:
        return frozenset(line.split("#")[0].strip().lower() for line in f if line.split("#")[0].strip())


def abstract_reason(root, lemmas=ABSTRACT_LEMMAS, entity_labels=ABSTRACT_ENTITY_LABELS) -> str | None:
    """Why the chunk with head token `root` is abstract ('pronoun', 'number', 'entity', 'lemma'), or None."""
    if root.pos_ == "PRON":
        return "pronoun"
    if root.pos_ == "NUM" or root.like_num:
        return "number"
    if root.ent_type_ in entity_labels:
        return "entity"
    if root.lemma_.lower() in lemmas or root.lower_ in lemmas:
        return "lemma"
    return None


def is_abstract(root, lemmas=ABSTRACT_LEMMAS, entity_labels=ABSTRACT_ENTITY_LABELS) -> bool:
    return abstract_reason(root, lemmas, entity_labels) is not None
