"""The procedurally generated grounded dataset ("shapes"): images with 1-4 coloured shapes on varied
backgrounds, captions naming them with attributes and relations, exact boxes, in the GRIT record
schema. Pure numpy/PIL and seeded: example i of a split depends only on (seed, split, i).

    a red circle to the left of two blue squares
    noun_chunks: [0, 12, box of the circle, 1.0], [28, 44, box of square 1, 1.0], [28, 44, box of square 2, 1.0]
    ref_exps:    [0, 44, box of the circle, 1.0], ...
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from kosmos2_jax.utils.errors import UsageError

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def _background(rng, size):
    kind = rng.integers(3)
    base = rng.integers(60, 200, 3)
    if kind == 0:  # flat
        arr = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    elif kind == 1:  # gradient
        other = rng.integers(60, 200, 3)
        t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None] if rng.random() < 0.5 else \
            np.linspace(0, 1, size, dtype=np.float32)[None, :, None]
        arr = base * (1 - t) + other * t
        arr = np.broadcast_to(arr, (size, size, 3))
    else:  # noise texture
        arr = base + rng.normal(0, 18, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw(draw, shape, box, colour):
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour, outline=(0, 0, 0))
    elif shape == "square":
        draw.rectangle(box, fill=colour, outline=(0, 0, 0))
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour, outline=(0, 0, 0))


def _place(rng, size, taken, max_tries=50):
    for _ in range(max_tries):
        side = int(rng.integers(size // 5, int(size / 2.5)))
        x, y = (int(v) for v in rng.integers(0, size - side, 2))
        box = (x, y, x + side, y + side)
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            return box
    return None


def _relation(a, b):
    """Spatial relation of group a to group b from their union boxes' centres."""
    (ax, ay), (bx, by) = [((g[0] + g[2]) / 2, (g[1] + g[3]) / 2) for g in (a, b)]
    dx, dy = bx - ax, by - ay
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _count_word(count: int, next_word: str) -> str:
    if count == 1:
        return "an" if next_word[0] in "aeiou" else "a"
    return NUMBER_WORDS[count]


def _union(boxes):
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def make_example(seed: int, split: str, index: int, image_size: int = 128) -> dict:
    """One grounded record: encoded PNG, caption, GRIT-style noun_chunks/ref_exps (normalized boxes)."""
    rng = np.random.default_rng([seed, SPLIT_SEEDS.get(split, 9), index])
    image = _background(rng, image_size)
    draw = ImageDraw.Draw(image)
    colours = list(COLOURS)
    groups, taken = [], []
    for _ in range(int(rng.integers(1, 3))):  # one or two groups -> a relation between them
        colour = colours[rng.integers(len(colours))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        if any(g["colour"] == colour and g["shape"] == shape for g in groups):
            continue
        count = int(rng.choice([1, 1, 2, 3]) if len(taken) < 2 else 1)
        boxes = []
        for _ in range(count):
            box = _place(rng, image_size, taken)
            if box is None:
                break
            taken.append(box)
            boxes.append(box)
            _draw(draw, shape, box, COLOURS[colour])
        if boxes:  # reading order (left to right, then top to bottom): a learnable order for multi-box phrases
            groups.append({"colour": colour, "shape": shape, "boxes": sorted(boxes, key=lambda b: (b[0], b[1]))})
    phrases = [f"{_count_word(len(g['boxes']), g['colour'])} {g['colour']} {g['shape']}{'s' if len(g['boxes']) > 1 else ''}"
               for g in groups]
    if len(groups) == 2:
        caption = f"{phrases[0]} {_relation(_union(groups[0]['boxes']), _union(groups[1]['boxes']))} {phrases[1]}"
    else:
        caption = phrases[0]
    chunks, exps = [], []
    pos = 0
    for i, (phrase, group) in enumerate(zip(phrases, groups)):
        start = caption.index(phrase, pos)
        end = start + len(phrase)
        pos = end
        exp_end = len(caption) if i == 0 else end  # the first chunk's expression runs to the end
        for box in group["boxes"]:
            norm = [box[0] / image_size, box[1] / image_size, box[2] / image_size, box[3] / image_size]
            chunks.append([start, end, *norm, 1.0])
            exps.append([start, exp_end, *norm, 1.0])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"key": f"{split}-{index:07d}", "image": buf.getvalue(), "caption": caption,
            "width": image_size, "height": image_size,
            "noun_chunks": np.asarray(chunks, np.float32).reshape(-1, 7),
            "ref_exps": np.asarray(exps, np.float32).reshape(-1, 7)}


def refexp_examples(record: dict) -> list[dict]:
    """Referring-expression items of a record: one per single-object noun chunk (its text, its box)."""
    out = []
    chunks = record["noun_chunks"]
    for start, end in {(int(c[0]), int(c[1])) for c in chunks}:
        boxes = [c[2:6] for c in chunks if int(c[0]) == start and int(c[1]) == end]
        if len(boxes) == 1:
            out.append({"expression": record["caption"][start:end], "box": np.asarray(boxes[0], np.float32)})
    return sorted(out, key=lambda e: e["expression"])


# other words for the colours, which the captions never use (the LoRA demo's new referring words;
# each spelled with letters the captions have, so the demo's tokenizer reads it back unchanged)
SYNONYMS = {"red": "scarlet", "green": "olive", "blue": "navy", "yellow": "golden", "purple": "violet",
            "orange": "tangerine", "white": "ivory", "black": "ebony"}


def refexp_lines(seed: int, split: str, num: int, vocabulary: str = "captions", image_size: int = 128):
    """(image file name, PNG bytes, [refexp JSONL lines]) for the first `num` examples of a split:
    one line per single-object noun chunk with its pixel box, the chunk's own words ("captions":
    "a red circle") or another word for its colour ("synonyms": "the scarlet shape"; only in
    images of two shapes of different colours, so that the word alone tells which)."""
    for i in range(num):
        record = make_example(seed, split, i, image_size=image_size)
        items = refexp_examples(record)
        colours = [e["expression"].split()[1] for e in items]
        if vocabulary == "synonyms" and (len(items) != 2 or len(set(colours)) != 2
                                         or len(record["noun_chunks"]) != 2):
            continue
        name = f"{split}-{i}.png"
        lines = [{"image": name,
                  "expression": f"the {SYNONYMS[colour]} shape" if vocabulary == "synonyms" else e["expression"],
                  "box": [round(float(v) * image_size, 3) for v in e["box"]], "width": image_size, "height": image_size}
                 for e, colour in zip(items, colours)]
        yield name, record["image"], lines


def main(argv=None) -> int:
    """`python -m kosmos2_jax.data.synthetic captions --num 4000 --out captions.txt`: training text
    for the demo's sentencepiece model. `... images --split test --num 6 --out DIR`: images of a
    split as PNG files (the web demo's examples: held-out images the demo model never saw)."""
    from kosmos2_jax.utils import cli
    from kosmos2_jax.utils import outputs

    parser = cli.ArgumentParser(prog="python -m kosmos2_jax.data.synthetic")
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("captions", help="write the captions of the first N train examples")
    cap.add_argument("--num", type=cli.integer(1), default=4000)
    cap.add_argument("--seed", type=cli.integer(), default=0)
    cap.add_argument("--out", required=True, type=cli.output_file)
    cap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    img = sub.add_parser("images", help="write the first N images of a split as SPLIT-I.png")
    img.add_argument("--split", default="test", choices=tuple(SPLIT_SEEDS))
    img.add_argument("--num", type=cli.integer(1), default=6)
    img.add_argument("--seed", type=cli.integer(), default=0)
    img.add_argument("--size", type=cli.integer(16), default=128, help="pixels (the shapes dataset's: 128)")
    img.add_argument("--out", required=True, type=cli.output_dir, help="a folder")
    img.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    ref = sub.add_parser("refexp", help="write referring expressions of a split as SPLIT.jsonl + images/ "
                                        "(data/annotations.py's refexp format)")
    ref.add_argument("--split", default="train", choices=tuple(SPLIT_SEEDS))
    ref.add_argument("--num", type=cli.integer(1), default=2000, help="examples of the split to read")
    ref.add_argument("--vocabulary", default="captions", choices=("captions", "synonyms"),
                     help="captions: the chunk's words ('a red circle'); synonyms: another word for the colour "
                          "('the scarlet shape')")
    ref.add_argument("--seed", type=cli.integer(), default=0)
    ref.add_argument("--out", required=True, type=cli.output_dir, help="a folder")
    ref.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    args = parser.parse_args(argv)
    try:
        outputs.refuse_existing(args.out, args.overwrite)
    except UsageError as e:
        return cli.error(str(e))
    if args.command == "refexp":
        count = 0
        with outputs.atomic_dir(args.out) as tmp:
            os.makedirs(os.path.join(tmp, "images"))
            with open(os.path.join(tmp, f"{args.split}.jsonl"), "w") as jsonl:
                for name, png, lines in refexp_lines(args.seed, args.split, args.num, args.vocabulary):
                    with open(os.path.join(tmp, "images", name), "wb") as f:
                        f.write(png)
                    for line in lines:
                        jsonl.write(json.dumps(line) + "\n")
                    count += len(lines)
        print(f"wrote {count} {args.split} expressions ({args.vocabulary}) to {args.out}/{args.split}.jsonl")
        return 0
    if args.command == "images":
        with outputs.atomic_dir(args.out) as tmp:
            for i in range(args.num):
                with open(os.path.join(tmp, f"{args.split}-{i}.png"), "wb") as f:
                    f.write(make_example(args.seed, args.split, i, image_size=args.size)["image"])
        print(f"wrote {args.num} {args.split} images to {args.out}")
        return 0
    with outputs.atomic_file(args.out) as f:
        for i in range(args.num):
            f.write(make_example(args.seed, "train", i, image_size=32)["caption"] + "\n")
    print(f"wrote {args.num} captions to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
