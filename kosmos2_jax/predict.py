"""Grounded generation on images, with the boxes drawn.

    python -m kosmos2_jax.predict --checkpoint ckpt/kosmos2 --tokenizer sentencepiece.bpe.model \\
        --image snowman.png --prompt "<grounding>An image of" --out annotated.png --json out.json
    python -m kosmos2_jax.predict ... --prompt "<grounding><phrase>It</phrase> is" --box "It=0.39,0.05,0.98,0.83"

`--checkpoint` is a kosmos2_jax checkpoint (`convert from-hf` output) or a Hugging Face model folder.
`--box "PHRASE=x1,y1,x2,y2"` writes a box after `<phrase>PHRASE</phrase>` in the prompt (the phrase
is tagged if the prompt has it untagged); coordinates are normalized to [0, 1], or pixels of each
image with `--box_units px`. Decoding defaults to the released model's settings (greedy, n-gram 3).
A prompt with characters the tokenizer cannot encode is refused (they would be dropped silently).
"""

from __future__ import annotations

import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax

from kosmos2_jax.weights import checkpoint
from kosmos2_jax import weights
from kosmos2_jax.format import grounding
from kosmos2_jax.inference.generate import generate, prepare, shard_params
from kosmos2_jax.models import Kosmos2
from kosmos2_jax.format.processor import load_image, processor_for
from kosmos2_jax.format.visualize import draw_entities
from kosmos2_jax.utils.errors import UsageError


def parse_box(spec: str, image_size: tuple[int, int] | None = None, units: str = "normalized"
              ) -> tuple[str, tuple[float, float, float, float]]:
    """`"a dog=0.1,0.2,0.5,0.9"` -> ("a dog", normalized box). `units="px"`: pixel coordinates of
    an image of `image_size` (w, h)."""
    phrase, sep, coords = spec.rpartition("=")
    if not sep or not phrase.strip():
        raise UsageError(f"--box {spec!r}: expected PHRASE=x1,y1,x2,y2")
    try:
        values = [float(c) for c in coords.split(",")]
    except ValueError:
        raise UsageError(f"--box {spec!r}: coordinates must be 4 numbers") from None
    if len(values) != 4:
        raise UsageError(f"--box {spec!r}: expected 4 coordinates, got {len(values)}")
    if units == "px":
        w, h = image_size
        values = [values[0] / w, values[1] / h, values[2] / w, values[3] / h]
    elif any(not 0 <= v <= 1 for v in values):
        raise UsageError(f"--box {spec!r}: normalized coordinates must be in [0, 1] "
                         f"(pixels need --box_units px)")
    box = tuple(values)
    try:
        grounding.box_to_patch_pair(box)
    except ValueError as e:
        raise UsageError(f"--box {spec!r}" + (f" on a {image_size[0]}x{image_size[1]} image" if units == "px" else "")
                         + f": {e}") from None
    return phrase.strip(), box


_MARKUP = re.compile(r"<phrase>.*?</phrase>|<[^<>]*>")


def _tag_phrase(prompt: str, phrase: str) -> str:
    """`prompt` with `phrase` tagged: an already-tagged `<phrase> PHRASE</phrase>` (any spaces
    inside) is kept; else its first whole-word occurrence in the text, outside any markup, is
    tagged, with the space before it inside the tags (the model's format: `of<phrase> a dog</phrase>`)."""
    tagged = re.compile(r"<phrase>\s*" + re.escape(phrase) + r"\s*</phrase>")
    if tagged.search(prompt):
        return prompt
    masked = _MARKUP.sub(lambda m: "\0" * len(m.group()), prompt)  # markup never matches a phrase
    match = re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", masked)
    if match is None:
        raise UsageError(f"--box phrase {phrase!r} does not occur as whole words in the text of the prompt {prompt!r}")
    start, end = match.span()
    if start and prompt[start - 1] == " ":
        start -= 1
    return f"{prompt[:start]}<phrase>{prompt[start:end]}</phrase>{prompt[end:]}"


def prompt_with_boxes(prompt: str, boxes: list[tuple[str, tuple]]) -> tuple[str, list | None]:
    """Tag each boxed phrase in the prompt and build the processor's `bboxes` list (one entry per
    `<phrase>` of the prompt: the boxes given for it, or None)."""
    for phrase, _ in boxes:
        prompt = _tag_phrase(prompt, phrase)
    if not boxes:
        return prompt, None
    by_phrase = {}
    for phrase, box in boxes:
        by_phrase.setdefault(phrase, []).append(box)
    bboxes = [by_phrase.get(m.group(1).strip()) for m in re.finditer(r"<phrase>(.+?)</phrase>", prompt)]
    return prompt, bboxes


def parse_args(argv):
    from kosmos2_jax.utils import cli

    p = cli.ArgumentParser(prog="python -m kosmos2_jax.predict", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=cli.existing_dir,
                   help="our checkpoint folder or a HF folder (required; with --compile_only only its config is read, "
                        "and without it the released 1.6B architecture is sized)")
    p.add_argument("--tokenizer", type=cli.existing_file, help="sentencepiece model (required)")
    p.add_argument("--image", action="append", type=cli.existing_file, help="repeat for a batch (required)")
    p.add_argument("--prompt", default="<grounding>An image of")
    p.add_argument("--box", action="append", default=[], help='"PHRASE=x1,y1,x2,y2" (repeatable)')
    p.add_argument("--box_units", default="normalized", choices=("normalized", "px"),
                   help="--box coordinates: normalized to [0, 1], or pixels of each image")
    p.add_argument("--num_beams", type=cli.integer(1), default=1)
    p.add_argument("--max_new_tokens", type=cli.integer(1), default=128)
    p.add_argument("--no_repeat_ngram_size", type=cli.integer(0), default=3, help="0: no n-gram blocking")
    p.add_argument("--out", type=cli.output_file,
                   help="annotated image, in the format its extension names (PNG when none; NAME_i.EXT per image when several)")
    p.add_argument("--json", type=cli.output_file, help="write results as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out / --json files")
    cli.add_decode_mode_flags(p)
    cli.add_mesh_flag(p)
    cli.add_compilation_cache_flags(p)
    sizing = p.add_argument_group("sizing a serving slice (inference/serving_check.py; needs libtpu, no TPU)")
    sizing.add_argument("--compile_only", action="store_true",
                        help="compile the accelerator mode for one chip of --topology and report its memory; "
                             "generates nothing")
    sizing.add_argument("--topology", default="", help="with --compile_only: a TPU slice, e.g. v5e-4 or v5p-8")
    sizing.add_argument("--batch_size", type=cli.integer(1), default=64, help="with --compile_only: prompts per chip")
    sizing.add_argument("--prompt_tokens", type=cli.integer(1), default=96,
                        help="with --compile_only: prompt length, the image's slots included")
    args = p.parse_args(argv)
    if args.compile_only and not args.topology:
        p.error("--compile_only needs --topology (e.g. v5e-4 or v5p-8)")
    missing = [f"--{n}" for n in ("checkpoint", "tokenizer", "image") if not getattr(args, n)]
    if missing and not args.compile_only:
        p.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def image_format(path: str) -> str:
    from PIL import Image

    return Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")


def output_paths(args) -> list[str]:
    """The files this run writes: --json, and --out (NAME_i.png per image when several)."""
    paths = [args.json] if args.json else []
    if args.out:
        stem, ext = os.path.splitext(args.out)
        paths += [args.out] if len(args.image) == 1 else [f"{stem}_{i}{ext or '.png'}" for i in range(len(args.image))]
    return paths


def main(argv=None) -> int:
    from kosmos2_jax.utils import cli

    args = parse_args(argv)
    cli.apply_compilation_cache_flags(args)
    return cli.run(lambda: predict(args))


def size_serving(args) -> int:
    from kosmos2_jax.inference import serving_check
    from kosmos2_jax.models.config import kosmos2_1p6b

    config = (weights.model_config_of(args.checkpoint, **weights.DECODING) if args.checkpoint
              else kosmos2_1p6b().replace(**weights.DECODING))
    model = Kosmos2(config)
    shapes = weights.abstract_params_of(args.checkpoint, model) if args.checkpoint else weights.abstract_params(model)
    serving_check.check(model, shapes, args.topology, args.batch_size, args.max_new_tokens, args.prompt_tokens,
                        args.num_beams, args.tokens_per_call, args.mesh)
    return 0


def predict(args) -> int:
    from kosmos2_jax.models import sharding
    from kosmos2_jax.utils import outputs

    if args.compile_only:
        return size_serving(args)
    mesh = sharding.local_mesh(args.mesh)  # a bad --mesh before anything is loaded

    for path in output_paths(args):
        outputs.refuse_existing(path, args.overwrite, "--json" if path == args.json else "--out")
    images = [load_image(path) for path in args.image]
    per_image = []  # the prompt and its boxes for each image (pixel boxes depend on its size)
    for image in images:
        per_image.append(prompt_with_boxes(args.prompt, [parse_box(b, image.size, args.box_units) for b in args.box]))
    prompt = per_image[0][0]
    model = Kosmos2(weights.model_config_of(args.checkpoint, **weights.DECODING))
    processor = processor_for(args.tokenizer, model)
    tokenizer = processor.tokenizer
    unknown = tokenizer.unknown_characters(prompt)
    if unknown:
        raise UsageError(f"--prompt {args.prompt!r}: the tokenizer {args.tokenizer} cannot encode "
                         f"{' '.join(repr(c) for c in unknown)} (they would be dropped)")
    bboxes = [b for _, b in per_image] if args.box else None
    inputs = processor([prompt] * len(images), images=images, bboxes=bboxes, padding_side="left")
    # prompts padded to a multiple of 8 tokens (generate's default is 32): one caption pays for
    # less padding in its prefill, a stream of prompt lengths still reuses a few programs
    options = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                   no_repeat_ngram_size=args.no_repeat_ngram_size, eos_token_id=tokenizer.eos_id,
                   pad_token_id=tokenizer.pad_id, bucket=8, decode_mode=args.decode_mode,
                   tokens_per_call=args.tokens_per_call, mesh=mesh)
    start = time.perf_counter()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = weights.abstract_params_of(args.checkpoint, model)  # shared with the loader
    abstract = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
    with ThreadPoolExecutor(1) as pool:  # read the weights while the programs compile
        loading = pool.submit(weights.load_model, args.checkpoint, abstract=shapes, **weights.DECODING)
        try:
            prepare(model, abstract, inputs, **options)
        except Exception:  # a checkpoint's arrays that do not fit its model_config.json: say which
            if not weights.is_hf_folder(args.checkpoint):
                checkpoint.check_fits(args.checkpoint, shapes, model)
            raise
        finally:
            model, params = loading.result()
    if mesh is not None:
        params = shard_params(model, params, mesh)
    ready = time.perf_counter() - start
    start = time.perf_counter()
    out = generate(model, params, inputs, **options)
    elapsed = time.perf_counter() - start
    results = []
    for i, (path, image, ids) in enumerate(zip(args.image, images, out.sequences)):
        raw = processor.decode(ids)
        clean, entities = processor.post_process_generation(raw)
        w, h = image.size
        print(f"[{path}] {clean}")
        record = {"image": path, "prompt": processor.insert_boxes(prompt, per_image[i][1]), "text": processor.post_process_generation(raw, False),
                  "clean_text": clean, "entities": grounding.entity_records(entities, w, h)}
        for entity in record["entities"]:
            print(f"  {entity['phrase']!r} chars {entity['span'][0]}-{entity['span'][1]}: "
                  + "; ".join(f"({a}, {b}, {c}, {d})" for a, b, c, d in entity["boxes"]))
        results.append(record)
        if args.out:
            target = output_paths(args)[i + bool(args.json)]
            with outputs.atomic_file(target, "wb") as f:  # the format its name says (.jpg, .webp, ...), else PNG
                draw_entities(image, entities).save(f, format=image_format(target))
            print(f"  wrote {target}")
    if args.json:
        outputs.write_json(args.json, results, indent=2)
    print(f"loaded the weights and compiled (or took from the cache) in {ready:.1f}s; generated "
          f"{out.sequences.shape[0]} x {out.scores.shape[1]} tokens in {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
