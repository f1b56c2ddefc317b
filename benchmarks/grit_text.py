"""GRIT text stage (noun chunks + abstract filter + expressions) vs bare spaCy parsing, same run.

    .venv/bin/python benchmarks/grit_text.py [--captions 10000] [--processes 1 2] [--repeats 2]

Captions are generated from templates with varied syntax (prepositions, relative clauses,
conjunctions, possessives, numbers, abstract nouns), seeded. For each process count it times
(a) `list(nlp.pipe(captions))` and (b) the whole text stage over the same captions, alternating
(a)/(b) `--repeats` times and keeping each one's best; prints captions/s and the overhead
(b)/(a) - 1 (target <= 15%).
"""

import argparse
import time

import numpy as np

from kosmos2_jax.grit.text import load_spacy, text_stage

SUBJECTS = ["a dog", "two men", "an old woman", "the little girl", "a red car", "three children", "a brown horse",
            "a chef", "the cat", "a group of students", "a man in a suit", "a woman's hand", "love", "a close up"]
VERBS = ["sitting on", "standing next to", "walking along", "holding", "looking at", "playing with", "parked near",
         "leaning against", "running through", "lying under"]
OBJECTS = ["a wooden bench", "the beach at sunset", "a cup of coffee", "a field of flowers", "the kitchen table",
           "a tall tree", "his bicycle", "a busy street", "the snow", "a pair of shoes", "a plate of food"]
TAILS = ["", " in the rain", " that reads welcome home", " and a dog", " with a blue umbrella", " in 2019",
         " who is smiling at the camera", " on a sunny day", " next to a lake surrounded by trees"]


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[rng.integers(len(xs))]
    return [f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)}{pick(TAILS)}" for _ in range(n)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--captions", type=int, default=10000)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=256)
    args = p.parse_args()
    nlp = load_spacy()
    texts = captions(args.captions)
    print(f"spaCy model {nlp.meta['name']} {nlp.meta['version']}, {len(texts)} captions")
    print("| processes | bare nlp.pipe (captions/s) | text stage (captions/s) | overhead |\n|---|---|---|---|")
    for n_process in args.processes:
        bare, full = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            list(nlp.pipe(texts, batch_size=args.batch_size, n_process=n_process))
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            phrases = sum(len(r.phrases) for r in text_stage(nlp, texts, args.batch_size, n_process))
            full.append(time.perf_counter() - t)
        a, b = min(bare), min(full)
        print(f"| {n_process} | {len(texts) / a:.0f} | {len(texts) / b:.0f} | {100 * (b / a - 1):+.1f}% |", flush=True)
    print(f"({phrases} phrases kept from the last pass)")


if __name__ == "__main__":
    main()
