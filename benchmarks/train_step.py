"""One training step, ours (jitted JAX + optax AdamW) vs Hugging Face PyTorch (+ torch AdamW),
same config, weights and batch, same run.

    .venv/bin/python benchmarks/train_step.py [--batch 8] [--text_tokens 64] [--rounds 3] [--repeats 3] [--profile DIR]

The mid-size config of benchmarks/forward.py (6-layer 512-wide decoder, 6-layer 384-wide ViT/14 at
224 px, 64 latent queries, full vocabulary), float32. Both steps: forward, next-token cross-entropy
over the text positions, backward, AdamW update (LR 2e-4, beta (0.9, 0.98), eps 1e-6, wd 0.01). Ours
runs as the trainer runs it: the LM head only on chunks of positions that hold targets
(`--loss_chunk` positions per row, 64 as in kosmos2_pretrain.py; train/loss.py), layers as a Python
loop (`--scan` for `nn.scan`, which costs ~15% here: XLA:CPU zero-fills and copies the stacked
per-layer activations). The two losses of the first step are printed (they must agree: the same
computation). Ours and HF alternate for `--rounds` rounds of `--repeats` steps each; prints median
step times, tokens/s (all sequence positions) and the median of the per-round ratios (target >= 1.5x
HF).
"""

import argparse
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
from forward import median_time, setup  # noqa: E402

from conftest import loss_and_metrics  # noqa: E402

ADAMW = dict(b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loss_impl", choices=("plain", "chunked"), default="plain")
    parser.add_argument("--loss_chunk", type=int, default=64, help="with --loss_impl chunked")
    parser.add_argument("--scan", action="store_true", help="scan over layers (nn.scan) instead of a Python loop")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="after timing, trace 2 of our steps to DIR and print where their time goes")
    args = parser.parse_args()
    hf, model, params, length, (pixels, ids, attn, img) = setup(args.batch, args.text_tokens, scan_layers=args.scan)
    loss_mask = (img == 0).astype(np.int32)
    loss_mask[:, :66] = 0  # <s> <image> slots </image> are not targets
    batch = {"pixel_values": pixels, "input_ids": ids.astype(np.int32), "attention_mask": attn.astype(np.int32),
             "image_embeds_position_mask": img.astype(np.int32), "loss_mask": loss_mask}
    batch = jax.device_put(batch)

    tx = optax.adamw(2e-4, **ADAMW)

    def step(params, opt_state, batch):
        grads, metrics = jax.grad(lambda p: loss_and_metrics(model, p, batch, jax.random.PRNGKey(0), True, 0, 1,
                                                             loss_chunk=args.loss_chunk, loss_impl=args.loss_impl),
                                   has_aux=True)(params)
        with jax.named_scope("optimizer"):
            tokens = jnp.maximum(metrics["tokens"], 1)
            grads = jax.tree_util.tree_map(lambda g: g / tokens, grads)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, metrics["nll_sum"] / tokens

    state = [params, tx.init(params)]
    step = jax.jit(step, donate_argnums=(0, 1)).lower(state[0], state[1], batch).compile()

    def ours_step():
        state[0], state[1], loss = step(state[0], state[1], batch)
        jax.block_until_ready(state[0])
        return float(loss)

    ours_loss = ours_step()  # warm-up

    hf.train()
    for m in hf.modules():  # dropout off on both sides: the same computation
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("dropout", "attention_dropout", "activation_dropout"):  # HF's functional dropouts
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    opt = torch.optim.AdamW(hf.parameters(), lr=2e-4, betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"])
    t = dict(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), input_ids=torch.from_numpy(ids),
             attention_mask=torch.from_numpy(attn), image_embeds_position_mask=torch.from_numpy(img))
    targets = torch.from_numpy(ids[:, 1:].astype(np.int64))
    mask = torch.from_numpy(loss_mask[:, 1:].astype(np.float32))

    def hf_step():
        opt.zero_grad(set_to_none=True)
        logits = hf(**t).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                reduction="none")
        loss = (nll * mask.reshape(-1)).sum() / mask.sum()
        loss.backward()
        opt.step()
        return loss.item()

    hf_loss = hf_step()  # warm-up
    print(f"first-step loss: ours {ours_loss:.6f}, HF {hf_loss:.6f}")
    ours_times, hf_times, ratios = [], [], []
    for _ in range(args.rounds):
        ours_times.append(median_time(ours_step, args.repeats))
        hf_times.append(median_time(hf_step, args.repeats))
        ratios.append(hf_times[-1] / ours_times[-1])
    ours, theirs = float(np.median(ours_times)), float(np.median(hf_times))
    tokens = args.batch * length
    print(f"train step, batch {args.batch}, {length} tokens per row, 224 px; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"ours: loss_chunk {args.loss_chunk}, {'scan' if args.scan else 'loop'} over layers")
    print("| implementation | median s/step | tokens/s |\n|---|---|---|")
    print(f"| kosmos2_jax (jit, float32, optax AdamW) | {ours:.3f} | {tokens / ours:.0f} |")
    print(f"| HF transformers (PyTorch, float32, torch AdamW) | {theirs:.3f} | {tokens / theirs:.0f} |")
    print(f"ours / HF tokens/s per round: {', '.join(f'{r:.2f}x' for r in ratios)}; median {np.median(ratios):.2f}x")
    if args.profile:
        from kosmos2_jax.train import profiling

        profiling.trace(ours_step, 2, args.profile)
        print(f"\nour step, profiled (2 steps, {args.profile}):\n"
              + profiling.format_summary(profiling.summarize(args.profile, step.as_text(), 2), ours))


if __name__ == "__main__":
    main()
