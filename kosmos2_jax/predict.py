"""Grounded generation on images, with the boxes drawn.

    python -m kosmos2_jax.predict --checkpoint ckpt/kosmos2 --tokenizer sentencepiece.bpe.model \\
        --image snowman.png --prompt "<grounding>An image of" --out annotated.png --json out.json
    python -m kosmos2_jax.predict ... --prompt "<grounding><phrase>It</phrase> is" --box "It=0.39,0.05,0.98,0.83"

`--checkpoint` is a kosmos2_jax checkpoint (`convert from-hf` output) or a Hugging Face model folder.
`--box "PHRASE=x1,y1,x2,y2"` writes a box after `<phrase>PHRASE</phrase>` in the prompt (the phrase
is tagged if the prompt has it untagged); coordinates are normalized, or pixels of the first image
when any is above 1. Decoding defaults to the released model's settings (greedy, n-gram 3).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time


from kosmos2_jax import convert, grounding
from kosmos2_jax.generate import generate
from kosmos2_jax.processor import Kosmos2Processor, load_image
from kosmos2_jax.tokenizer import Kosmos2Tokenizer
from kosmos2_jax.visualize import draw_entities


def parse_box(spec: str, image_size: tuple[int, int] | None = None) -> tuple[str, tuple[float, float, float, float]]:
    """`"a dog=0.1,0.2,0.5,0.9"` -> ("a dog", normalized box); pixel coordinates need `image_size` (w, h)."""
    phrase, sep, coords = spec.rpartition("=")
    if not sep or not phrase.strip():
        raise ValueError(f"--box {spec!r}: expected PHRASE=x1,y1,x2,y2")
    try:
        values = [float(c) for c in coords.split(",")]
    except ValueError:
        raise ValueError(f"--box {spec!r}: coordinates must be 4 numbers") from None
    if len(values) != 4:
        raise ValueError(f"--box {spec!r}: expected 4 coordinates, got {len(values)}")
    if any(v > 1 for v in values):
        if image_size is None:
            raise ValueError(f"--box {spec!r}: pixel coordinates need an image")
        w, h = image_size
        values = [values[0] / w, values[1] / h, values[2] / w, values[3] / h]
    box = tuple(values)
    try:
        grounding.box_to_patch_pair(box)
    except ValueError as e:
        raise ValueError(f"--box {spec!r}: {e}") from None
    return phrase.strip(), box


def prompt_with_boxes(prompt: str, boxes: list[tuple[str, tuple]]) -> tuple[str, list | None]:
    """Tag each boxed phrase in the prompt and build the processor's `bboxes` list."""
    for phrase, _ in boxes:
        if f"<phrase>{phrase}</phrase>" not in prompt:
            if phrase not in prompt:
                raise ValueError(f"--box phrase {phrase!r} does not occur in the prompt {prompt!r}")
            prompt = prompt.replace(phrase, f"<phrase>{phrase}</phrase>", 1)
    if not boxes:
        return prompt, None
    by_phrase = {}
    for phrase, box in boxes:
        by_phrase.setdefault(phrase, []).append(box)
    bboxes = [by_phrase.get(m.group(1)) for m in re.finditer(r"<phrase>(.+?)</phrase>", prompt)]
    return prompt, bboxes


def tokenizer_for(spm_path: str, model) -> Kosmos2Tokenizer:
    """The tokenizer with as many location tokens as the model's vocabulary leaves room for
    (1024 for the released model; a demo model may use a smaller grid)."""
    tok = Kosmos2Tokenizer.from_file(spm_path)
    locations = model.config.text.vocab_size - (tok.vocab_size - tok.num_location_tokens)
    if locations != tok.num_location_tokens:
        if locations <= 0 or int(locations ** 0.5) ** 2 != locations:
            raise ValueError(f"tokenizer {spm_path!r} ({tok.vocab_size - tok.num_location_tokens} tokens before the "
                             f"location tokens) does not fit the model's vocabulary of {model.config.text.vocab_size}")
        tok = Kosmos2Tokenizer.from_file(spm_path, num_location_tokens=locations)
    return tok


def load_model(path: str):
    if os.path.isfile(os.path.join(path, "config.json")):
        return convert.load_hf(path)
    return convert.load_checkpoint(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kosmos2_jax.predict", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer", required=True, help="sentencepiece model")
    p.add_argument("--image", action="append", required=True, help="repeat for a batch")
    p.add_argument("--prompt", default="<grounding>An image of")
    p.add_argument("--box", action="append", default=[], help='"PHRASE=x1,y1,x2,y2" (repeatable)')
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--no_repeat_ngram_size", type=int, default=3)
    p.add_argument("--out", help="annotated PNG (NAME_i.png per image when several)")
    p.add_argument("--json", help="write results as JSON")
    args = p.parse_args(argv)
    try:
        images = [load_image(path) for path in args.image]
        boxes = [parse_box(b, images[0].size) for b in args.box]
        prompt, bboxes = prompt_with_boxes(args.prompt, boxes)
        model, params = load_model(args.checkpoint)
        tokenizer = tokenizer_for(args.tokenizer, model)
        processor = Kosmos2Processor(tokenizer, image_size=model.config.vision.image_size,
                                     num_image_tokens=model.config.latent_query_num)
        inputs = processor([prompt] * len(images), images=images, bboxes=[bboxes] * len(images) if bboxes else None,
                           padding_side="left")
        start = time.perf_counter()
        out = generate(model, params, inputs, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                       no_repeat_ngram_size=args.no_repeat_ngram_size, eos_token_id=tokenizer.eos_id,
                       pad_token_id=tokenizer.pad_id)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    results = []
    for i, (path, image, ids) in enumerate(zip(args.image, images, out.sequences)):
        raw = processor.decode(ids)
        clean, entities = processor.post_process_generation(raw)
        w, h = image.size
        print(f"[{path}] {clean}")
        record = {"image": path, "prompt": prompt, "text": processor.post_process_generation(raw, False),
                  "clean_text": clean, "entities": []}
        for name, span, ent_boxes in entities:
            pixels = [[round(x1 * w), round(y1 * h), round(x2 * w), round(y2 * h)] for x1, y1, x2, y2 in ent_boxes]
            print(f"  {name!r} chars {span[0]}-{span[1]}: " + "; ".join(f"({a}, {b}, {c}, {d})" for a, b, c, d in pixels))
            record["entities"].append({"phrase": name, "span": list(span), "boxes": pixels,
                                       "boxes_normalized": [list(b) for b in ent_boxes]})
        results.append(record)
        if args.out:
            stem, ext = os.path.splitext(args.out)
            target = args.out if len(images) == 1 else f"{stem}_{i}{ext or '.png'}"
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            draw_entities(image, entities).save(target)
            print(f"  wrote {target}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"generated {out.sequences.shape[0]} x {out.scores.shape[1]} tokens in {elapsed:.1f}s (includes compilation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
