"""One forward pass, ours (jitted JAX) vs Hugging Face PyTorch, same random weights, same run.

    .venv/bin/python benchmarks/forward.py [--batch 8] [--text_tokens 64] [--repeats 5]

Mid-size config: 6-layer 512-wide decoder (8 heads, FFN 2048), 6-layer 384-wide ViT/14 at 224 px
(6 heads, MLP 1536), 64 latent queries, the full 65037-token vocabulary. Prints the median time of
each and the ratio (HF / ours: > 1 means ours is faster). Compilation is excluded.
"""

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from hf_reference import grounded_batch, hf_model  # noqa: E402

from kosmos2_jax import weights  # noqa: E402

VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, image_size=224,
              patch_size=14)
TEXT = dict(vocab_size=65037, embed_dim=512, layers=6, ffn_dim=2048, attention_heads=8, max_position_embeddings=2048)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def parse_args(repeats: int):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser.parse_args()


def setup(batch: int, text_tokens: int, **config_overrides):
    """The benchmark's HF model, our model with the same weights (`config_overrides`, e.g.
    `scan_layers`, go to our config), and a grounded batch."""
    hf = hf_model(VISION, TEXT, 64)
    model = Kosmos2(weights.config_from_hf(hf.config.to_dict(), **config_overrides))
    params = weights.to_device(weights.params_from_hf(hf.state_dict(), model.config))
    length = 64 + 3 + text_tokens
    arrays = grounded_batch(np.random.default_rng(0), batch, 64, TEXT["vocab_size"], 224, [length] * batch)
    return hf, model, params, length, arrays


def main():
    args = parse_args(repeats=5)
    hf, model, params, length, (pixels, ids, attn, img) = setup(args.batch, args.text_tokens)

    fwd = jax.jit(model.apply)
    inputs = [jax.device_put(x) for x in (pixels, ids.astype(np.int32), attn.astype(np.int32), img.astype(np.int32))]
    fwd({"params": params}, *inputs).block_until_ready()  # compile
    ours = median_time(lambda: fwd({"params": params}, *inputs).block_until_ready(), args.repeats)

    t_inputs = dict(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(attn), image_embeds_position_mask=torch.from_numpy(img))
    with torch.no_grad():
        hf(**t_inputs)  # warm-up
        theirs = median_time(lambda: hf(**t_inputs), args.repeats)

    print(f"forward, batch {args.batch}, {length} tokens (64 image + {args.text_tokens} text + 3), 224 px; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("| implementation | median s/forward |")
    print("|---|---|")
    print(f"| kosmos2_jax (jit, float32) | {ours:.3f} |")
    print(f"| HF transformers (PyTorch, float32, eval) | {theirs:.3f} |")
    print(f"HF / ours = {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
