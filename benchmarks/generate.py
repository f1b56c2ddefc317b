"""Greedy generation speed, ours vs Hugging Face PyTorch, same random weights, same run.

    .venv/bin/python benchmarks/generate.py [--new_tokens 64] [--batches 1,8]

Mid-size config (as benchmarks/forward.py), one 224 px image per row, a 16-token text prompt after
the 64 image slots, 64 new tokens greedy (end-of-sequence disabled on both sides so both produce
exactly 64). Prints new tokens/s for each and the ratio; our compile time is reported separately
(first call) and excluded from the steady-state number.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
from forward import TEXT, VISION  # noqa: E402
from hf_reference import grounded_batch, hf_model  # noqa: E402

from kosmos2_jax import weights  # noqa: E402
from kosmos2_jax.inference.generate import generate  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    hf = hf_model(VISION, TEXT, 64)
    model = Kosmos2(weights.config_from_hf(hf.config.to_dict()))
    params = weights.to_device(weights.params_from_hf(hf.state_dict(), model.config))
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        pixels, ids, attn, img = grounded_batch(np.random.default_rng(0), batch, 64, TEXT["vocab_size"], 224,
                                                [64 + 3 + 16] * batch)
        inputs = dict(input_ids=ids, attention_mask=attn, image_embeds_position_mask=img, pixel_values=pixels)
        run = lambda: generate(model, params, inputs, max_new_tokens=args.new_tokens, eos_token_id=-1)
        start = time.perf_counter()
        out = run()
        first = time.perf_counter() - start
        assert out.sequences.shape[1] == ids.shape[1] + args.new_tokens
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        ours = min(times)
        with torch.no_grad():
            t = dict(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
                     input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn),
                     image_embeds_position_mask=torch.from_numpy(img))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                ref = hf.generate(**t, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
                times.append(time.perf_counter() - start)
            assert ref.shape[1] == ids.shape[1] + args.new_tokens
            theirs = min(times)
        new = batch * args.new_tokens
        rows.append((batch, new / ours, new / theirs, theirs / ours, first - ours))
    print(f"greedy, {args.new_tokens} new tokens, prompt = 64 image slots + 16 text tokens; "
          f"{os.cpu_count()} cores, jax {jax.__version__}, torch {torch.__version__}")
    print("| batch | kosmos2_jax new tok/s | HF new tok/s | ours / HF | our compile (s) |")
    print("|---|---|---|---|---|")
    for batch, ours, theirs, ratio, compile_s in rows:
        print(f"| {batch} | {ours:.1f} | {theirs:.1f} | {ratio:.2f}x | {compile_s:.1f} |")


if __name__ == "__main__":
    main()
