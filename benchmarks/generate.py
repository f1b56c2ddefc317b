"""Greedy generation speed, ours (each decoding mode) vs Hugging Face PyTorch, same random
weights, same run.

    .venv/bin/python benchmarks/generate.py [--config mid|narrow_deep|full|tiny] [--modes layerwise,fused]
        [--tokens_per_call 32] [--new_tokens 64] [--batches 1,8] [--repeats 3] [--layers unrolled|scanned]
        [--hf_device cpu|cuda|auto]

`mid`: the mid-size config of benchmarks/forward.py (6 layers of width 512, 224 px images);
`full`: the released 1.6B architecture (random weights); `tiny`: a seconds-scale smoke run.
`narrow_deep`: a stand-in for an accelerator at batch 1 on the CPU: 24 decoder layers of width 64
with the released vocabulary, so the per-token overhead (dispatches, host reads, per-layer work
that does not scale with width) dominates as it does on a GPU. One image per row, a 16-token text
prompt after the 64 image slots, 64 new tokens greedy (end-of-sequence disabled on both sides so
both produce exactly 64). Prints new tokens/s for each and the ratios; our compile time is reported
separately (first call) and excluded from the steady-state number.
"""

import argparse
import functools
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
from kosmos2_jax.models import Kosmos2  # noqa: E402

CONFIGS = {
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=7),
             dict(vocab_size=1000, embed_dim=64, layers=2, ffn_dim=128, attention_heads=4, max_position_embeddings=512)),
    "full": ({}, {}),  # the released 1.6B architecture (HF's defaults)
    "mid": (VISION, TEXT),
    "narrow_deep": (dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         image_size=56, patch_size=14),
                    dict(vocab_size=65037, embed_dim=64, layers=24, ffn_dim=256, attention_heads=4,
                         max_position_embeddings=2048)),
}


def main():
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="mid", choices=sorted(CONFIGS))
    parser.add_argument("--modes", default="layerwise,fused", help="decoding modes to time (generate's decode_mode)")
    parser.add_argument("--tokens_per_call", type=int, default=32, help="fused: decoding steps per dispatch")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls of each side, interleaved; the fastest counts")
    parser.add_argument("--layers", default="unrolled", choices=("unrolled", "scanned"),
                        help="the decoder's params: one array per layer (how predict, evaluate and serve load "
                             "them, weights.DECODING) or stacked for nn.scan (how training keeps them)")
    parser.add_argument("--hf_device", default="cpu", help="torch device for HF: cpu, cuda, or auto (cuda when "
                                                          "torch sees a GPU)")
    args = parser.parse_args()
    vision, text = CONFIGS[args.config]
    text = dict(text) or dict(vocab_size=65037)
    modes = args.modes.split(",")
    hf_device = ("cuda" if torch.cuda.is_available() else "cpu") if args.hf_device == "auto" else args.hf_device
    hf = hf_model(vision, text, 64)
    model = Kosmos2(weights.config_from_hf(hf.config.to_dict(), scan_layers=args.layers == "scanned"))
    params = weights.to_device(weights.params_from_hf(hf.state_dict(), model.config))
    hf = hf.to(hf_device)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        pixels, ids, attn, img = grounded_batch(np.random.default_rng(0), batch, 64, text["vocab_size"],
                                                model.config.vision.image_size, [64 + 3 + 16] * batch)
        inputs = dict(input_ids=ids, attention_mask=attn, image_embeds_position_mask=img, pixel_values=pixels)
        new = batch * args.new_tokens
        runs, compiles, outputs = {}, {}, {}
        for mode in modes:
            runs[mode] = functools.partial(generate, model, params, inputs, max_new_tokens=args.new_tokens,
                                           eos_token_id=-1, decode_mode=mode, tokens_per_call=args.tokens_per_call)
            start = time.perf_counter()
            outputs[mode] = runs[mode]().sequences
            compiles[mode] = time.perf_counter() - start
            assert outputs[mode].shape[1] == ids.shape[1] + args.new_tokens
        assert all(np.array_equal(outputs[modes[0]], o) for o in outputs.values()), "the modes disagree"
        with torch.no_grad():
            t = dict(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
                     input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn),
                     image_embeds_position_mask=torch.from_numpy(img))
            t = {k: v.to(hf_device) for k, v in t.items()}

            def hf_run():
                out = hf.generate(**t, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
                if hf_device != "cpu":
                    torch.cuda.synchronize()
                return out

            # untimed, as our first (compiling) call: torch's first call pays its own start-up
            assert hf_run().shape[1] == ids.shape[1] + args.new_tokens
            runs["HF"] = hf_run
            # each repeat times every side once, so a drift in the machine's speed (a shared host)
            # reaches all of them alike; the fastest of each side's repeats is its number
            times = {name: [] for name in runs}
            for _ in range(args.repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
        ours = {m: new / min(times[m]) for m in modes}
        compiles = {m: compiles[m] - min(times[m]) for m in modes}
        rows.append((batch, ours, compiles, new / min(times["HF"])))
    print(f"greedy, {args.config} ({args.layers} layers), {args.new_tokens} new tokens, prompt = 64 image slots + 16 text tokens, "
          f"fused: {args.tokens_per_call} tokens per call; ours on {jax.devices()[0].device_kind}, HF on {hf_device}; "
          f"{os.cpu_count()} cores, jax {jax.__version__}, torch {torch.__version__}")
    print("| batch | " + " | ".join(f"{m} tok/s (compile s) | {m} / HF" for m in modes) + " | HF tok/s |")
    print("|---|" + "---|---|" * len(modes) + "---|")
    for batch, ours, compiles, theirs in rows:
        cells = " | ".join(f"{ours[m]:.1f} ({compiles[m]:.1f}) | {ours[m] / theirs:.2f}x" for m in modes)
        print(f"| {batch} | {cells} | {theirs:.1f} |")


if __name__ == "__main__":
    main()
