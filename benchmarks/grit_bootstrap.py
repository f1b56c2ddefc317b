"""A trained KOSMOS-2 bootstrapping grounded data: the demo's model as GRIT's detector, scored
against the ground truth.

    make demo && .venv/bin/python benchmarks/grit_bootstrap.py [--images 200] [--checkpoint workdir/shapes_tiny/export]

Held-out shapes images (a seed the demo never trained on) go through `grit.build` with only their
*plain captions*: spaCy finds the noun chunks, the `kosmos2` detector (the demo's trained model)
grounds each one, NMS and the 0.65 threshold select, expressions are grown. The records are then
scored against the images' true boxes: a (noun chunk, box) pair is correct when the chunk is a
true phrase of the caption (same characters) and the box has IoU >= 0.5 with one of that phrase's
true boxes. Prints precision and recall of the pairs, the expressions' box accuracy, and what the
threshold and the text stage dropped. Without the checkpoint, trains a short demo model first
(`--train_steps`, the demo recipe otherwise).
"""

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_inputs(folder: pathlib.Path, count: int, seed: int) -> dict:
    """Captions + images of `count` held-out shapes examples -> {key: (caption, true chunks)}."""
    from kosmos2_jax.data.synthetic import make_example

    (folder / "images").mkdir(parents=True)
    truth = {}
    with open(folder / "captions.jsonl", "w") as f:
        for i in range(count):
            record = make_example(seed, "test", i)
            key = f"held-out-{i:05d}"
            (folder / "images" / f"{key}.png").write_bytes(record["image"])
            f.write(json.dumps({"key": key, "caption": record["caption"]}) + "\n")
            chunks = collections.defaultdict(list)
            for c in record["noun_chunks"]:
                chunks[(int(c[0]), int(c[1]))].append(tuple(float(v) for v in c[2:6]))
            truth[key] = (record["caption"], dict(chunks))
    return truth


def score(records: list[dict], truth: dict) -> dict:
    from kosmos2_jax.format.boxes import iou

    pairs = correct = 0
    found = collections.Counter()  # true (key, span) -> boxes matched
    wrong_text = collections.Counter()
    exps = exps_correct = 0
    for r in records:
        caption, chunks = truth[r["key"]]
        for c in r["noun_chunks"]:
            pairs += 1
            span, box = (int(c[0]), int(c[1])), tuple(c[2:6])
            true = chunks.get(span)
            if true is None:
                wrong_text[caption[span[0]:span[1]]] += 1
                continue
            if max(iou(box, t) for t in true) >= 0.5:
                correct += 1
                found[(r["key"], span)] += 1
        for e in r["ref_exps"]:  # an expression is right when its box matches its chunk's true boxes
            exps += 1
            head = [c for c in r["noun_chunks"] if int(c[0]) == int(e[0]) and tuple(c[2:6]) == tuple(e[2:6])]
            true = chunks.get((int(e[0]), int(head[0][1]))) if head else None
            exps_correct += bool(true) and max(iou(tuple(e[2:6]), t) for t in true) >= 0.5
    true_pairs = sum(len(boxes) for _, chunks in truth.values() for boxes in chunks.values())
    recalled = sum(min(n, len(truth[k][1][span])) for (k, span), n in found.items())
    return {"pairs": pairs, "precision": correct / max(pairs, 1), "true_pairs": true_pairs,
            "recall": recalled / max(true_pairs, 1), "expressions": exps,
            "expression_accuracy": exps_correct / max(exps, 1), "not_a_true_phrase": dict(wrong_text.most_common(5))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(REPO / "workdir" / "shapes_tiny" / "export"))
    p.add_argument("--tokenizer", default=str(REPO / "workdir" / "demo_data" / "spm" / "shapes.model"))
    p.add_argument("--data", default=str(REPO / "workdir" / "demo_data"), help="the demo's data (make demo-data)")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--seed", type=int, default=7, help="the held-out images' seed (the demo trains on seed 0)")
    p.add_argument("--train_steps", type=int, default=600, help="steps of the model trained when --checkpoint is absent")
    p.add_argument("--thresholds", default="0.65,0.3,0.1,0.0",
                   help="score thresholds to build with (GRIT's is 0.65), one table row each")
    args = p.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if not os.path.isdir(args.checkpoint):
        print(f"no checkpoint at {args.checkpoint}: training the demo recipe for {args.train_steps} steps", flush=True)
        run = tmp / "train"
        subprocess.run([sys.executable, "-m", "kosmos2_jax.train", "--config", f"experiments/shapes_tiny.py:data={args.data}",
                        "--workdir", str(run), f"--config.train.steps={args.train_steps}"], check=True, cwd=REPO, env=env)
        args.checkpoint = str(run / "export")
    truth = write_inputs(tmp / "in", args.images, args.seed)
    from kosmos2_jax.grit.records import read_records

    print(f"{args.images} held-out shapes images (seed {args.seed}), checkpoint {args.checkpoint}")
    print("| score threshold | records written | (chunk, box) pairs | precision @ IoU 0.5 | recall (of true pairs) "
          "| expression box accuracy | below threshold | build |")
    print("|---|---|---|---|---|---|---|---|")
    notes = []
    for threshold in [float(t) for t in args.thresholds.split(",")]:
        out = tmp / f"out_{threshold}"
        start = time.time()
        build = subprocess.run([sys.executable, "-m", "kosmos2_jax.grit.build", "--input", str(tmp / "in" / "captions.jsonl"),
                                "--out", str(out), "--detector", "kosmos2", "--detector_path", args.checkpoint,
                                "--tokenizer", args.tokenizer, "--runner", "local", "--batch_size", "16",
                                "--score_threshold", str(threshold)], capture_output=True, text=True, cwd=REPO, env=env)
        if build.returncode:
            sys.exit(build.stderr[-3000:])
        stats = json.loads((out / "stats.json").read_text())
        r = score(read_records(str(out)), truth)
        print(f"| {threshold} | {stats['written']} of {stats['captions_in']} | {r['pairs']} | {r['precision']:.1%} | "
              f"{r['recall']:.1%} (of {r['true_pairs']}) | {r['expression_accuracy']:.1%} "
              f"({r['expressions']}) | {stats['below_threshold']} | {time.time() - start:.0f} s |", flush=True)
        notes.append(f"threshold {threshold}: chunks {stats['chunks']}, abstract-filtered {stats['abstract_filtered']}, "
                     f"removed by NMS {stats['removed_by_nms']}; pairs whose chunk is not a true phrase: "
                     f"{r['not_a_true_phrase']}")
    print("\n".join(notes))


if __name__ == "__main__":
    main()
