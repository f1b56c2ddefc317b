"""Caption metrics through pycocoevalcap: PTB tokenization, then BLEU-1..4, METEOR, CIDEr(-D) --
the scorers and order of its `COCOEvalCap` driver, without needing a COCO annotation object."""

from __future__ import annotations

from typing import Mapping, Sequence

from kosmos2_jax.utils.errors import UsageError


def caption_scores(predictions: Mapping, references: Mapping[object, Sequence[str]], meteor: bool = True) -> dict:
    """predictions {id: caption}, references {id: [captions]} -> {Bleu_1..4, METEOR, CIDEr}.
    METEOR runs pycocoevalcap's Java jar (skipped with meteor=False, or when `java` is missing)."""
    import shutil

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    missing = [k for k in predictions if k not in references]
    if missing:
        raise UsageError(f"{len(missing)} predictions have no references (e.g. {missing[:3]})")
    if shutil.which("java") is None:
        raise RuntimeError("pycocoevalcap's PTB tokenizer needs Java (`java` on PATH)")
    ids = list(predictions)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    out = {}
    bleu, _ = Bleu(4).compute_score(gts, res)
    out.update({f"Bleu_{n + 1}": float(v) for n, v in enumerate(bleu)})
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        out["METEOR"] = float(scorer.compute_score(gts, res)[0])
        del scorer
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out
