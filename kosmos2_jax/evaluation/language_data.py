"""The paper's zero-shot language tasks from the tfds catalog -> the `language` task's JSONL.

    python -m kosmos2_jax.evaluation.language_data --out lang/validation.jsonl [--tasks BoolQ COPA ...]
        [--data_dir ~/tensorflow_datasets] [--max_per_task N]

Prompt formats follow the common zero-shot conventions (lm-evaluation-harness style), which the
paper does not spell out:
- StoryCloze: the four context sentences; each ending is a candidate.
- HellaSwag: "{activity}: {context}"; each ending ([title]/[header] markers cleaned).
- Winograd (wsc273) and Winogrande: partial scoring -- each option is substituted for the pronoun
  (or "_"), and the rest of the sentence is the scored continuation (one context per candidate).
- PIQA: "Question: {goal}\\nAnswer:" + " {solution}".
- BoolQ: "{passage}\\nQuestion: {question}?\\nAnswer:" + " no" / " yes".
- CB: "{premise}\\nQuestion: {hypothesis} True, False or Neither?\\nAnswer:" + " True" / " False" / " Neither".
- COPA: the premise without its final period + " because" (cause) / " therefore" (effect) + " {choice}"
  with its first letter lower-cased.
StoryCloze needs its manual download (tfds `story_cloze`); the others download through tfds. Each
task says where it reads from; a dataset that needs a download whose host cannot be reached (an
offline machine) is refused in seconds, before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import urllib.parse

from kosmos2_jax.utils.errors import UsageError


TFDS = {  # task -> (tfds name, split)
    "StoryCloze": ("story_cloze", "validation"), "HellaSwag": ("hellaswag", "validation"),
    "Winograd": ("wsc273", "test"), "Winogrande": ("winogrande", "validation"), "PIQA": ("piqa", "validation"),
    "BoolQ": ("super_glue/boolq", "validation"), "CB": ("super_glue/cb", "validation"),
    "COPA": ("super_glue/copa", "validation"),
}


def _s(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def convert(task: str, ex: dict, index: int) -> dict:
    """One tfds example -> one JSONL item."""
    item = {"id": f"{task}-{index}", "task": task, "label": int(ex["label"])}
    if task == "BoolQ":
        item.update(context=f"{_s(ex['passage'])}\nQuestion: {_s(ex['question'])}?\nAnswer:", candidates=[" no", " yes"])
    elif task == "CB":
        item.update(context=f"{_s(ex['premise'])}\nQuestion: {_s(ex['hypothesis'])} True, False or Neither?\nAnswer:",
                    candidates=[" True", " False", " Neither"])
    elif task == "COPA":
        connector = {"cause": " because", "effect": " therefore"}[_s(ex["question"])]
        item.update(context=_s(ex["premise"]).strip().rstrip(".") + connector,
                    candidates=[" " + _lower_first(_s(ex["choice1"])), " " + _lower_first(_s(ex["choice2"]))])
    elif task == "PIQA":
        item.update(context=f"Question: {_s(ex['goal'])}\nAnswer:", candidates=[" " + _s(ex["sol1"]), " " + _s(ex["sol2"])])
    elif task == "HellaSwag":
        context = _hellaswag_clean(f"{_s(ex['activity_label'])}: {_s(ex['context'])}")
        item.update(context=context, candidates=[" " + _hellaswag_clean(_s(e)) for e in ex["endings"]])
    elif task == "StoryCloze":
        context = ex["context"]
        context = " ".join(_s(c) for c in context) if not isinstance(context, (str, bytes)) else _s(context)
        item.update(context=context, candidates=[" " + _s(e) for e in ex["endings"]])
    elif task == "Winogrande":
        sentence = _s(ex["sentence"])
        cut = sentence.index("_")
        rest = " " + sentence[cut + 1:].strip()
        item.update(contexts=[sentence[:cut] + _s(ex["option1"]), sentence[:cut] + _s(ex["option2"])],
                    candidates=[rest, rest])
    elif task == "Winograd":
        text, start, end = _s(ex["text"]), int(ex["pronoun_start"]), int(ex["pronoun_end"])
        rest = " " + text[end:].strip()
        item.update(contexts=[text[:start] + _s(ex["option1"]), text[:start] + _s(ex["option2"])], candidates=[rest, rest])
    else:
        raise UsageError(f"unknown task {task!r}; one of {sorted(TFDS)}")
    return item


def main(argv=None) -> int:
    from kosmos2_jax.utils import cli
    from kosmos2_jax.utils import outputs

    p = cli.ArgumentParser(prog="python -m kosmos2_jax.evaluation.language_data", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=cli.output_file, help="JSONL to write")
    p.add_argument("--tasks", nargs="+", default=sorted(TFDS), choices=sorted(TFDS))
    p.add_argument("--data_dir", default=None, help="tfds data_dir")
    p.add_argument("--max_per_task", type=cli.integer(0), default=0, help="0: all")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    try:
        outputs.refuse_existing(args.out, args.overwrite)
    except UsageError as e:
        return cli.error(str(e))
    import tensorflow_datasets as tfds

    def fail(message):
        raise SystemExit(cli.error(message))

    builders = {task: tfds.builder(TFDS[task][0], data_dir=args.data_dir) for task in args.tasks}
    for task, builder in builders.items():  # all checked before anything is read or written
        where = os.path.dirname(os.path.dirname(builder.data_dir))
        if os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json")):
            print(f"{task}: tfds {TFDS[task][0]} [{TFDS[task][1]}], prepared in {where}", flush=True)
            continue
        if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
            fail(f"{task} (tfds {TFDS[task][0]}) is not prepared in {where} and needs a manual download: "
                 f"`tfds build {TFDS[task][0]} --data_dir {where} --manual_dir DIR` (see the tfds catalog), "
                 "or leave it out of --tasks")
        hosts = sorted({urllib.parse.urlparse(u).hostname for u in (builder.url_infos or {})} - {None})
        print(f"{task}: tfds {TFDS[task][0]} [{TFDS[task][1]}] is not prepared in {where}: downloading it from "
              f"{', '.join(hosts) or 'its source'}", flush=True)
        for host in hosts:
            try:
                socket.create_connection((host, 443), timeout=5).close()
            except OSError as e:
                fail(f"{task}: cannot reach {host} to download tfds {TFDS[task][0]} ({e}): prepare it on a "
                     f"machine with a network (`tfds build {TFDS[task][0]} --data_dir DIR`) and pass --data_dir DIR")

    with outputs.atomic_file(args.out) as f:  # a failed task leaves no half-written file
        for task, builder in builders.items():
            name, split = TFDS[task]
            try:
                builder.download_and_prepare()
                ds = builder.as_dataset(split=split)
            except Exception as e:  # tfds raises many types for missing/undownloadable data
                fail(f"{task} ({name}): {' '.join(str(e).split())[:300]}")
            n = 0
            for i, ex in enumerate(tfds.as_numpy(ds)):
                if args.max_per_task and n == args.max_per_task:
                    break
                f.write(json.dumps(convert(task, ex, i)) + "\n")
                n += 1
            print(f"{task}: {n} items from {name} [{split}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
