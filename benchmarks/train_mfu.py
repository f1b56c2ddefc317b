"""The trainer's own train step on a full-size config: tokens/s and MFU (model FLOPs utilization).

    python benchmarks/train_mfu.py                          # experiments/kosmos2_pretrain.py, 4 packed rows
    python benchmarks/train_mfu.py --rows 8 --max_images 12 --steps 20
    python benchmarks/train_mfu.py --tiny --steps 2         # a seconds-scale CPU smoke run
    python benchmarks/train_mfu.py --profile /tmp/prof      # + where the time goes, by model part and op kind
    python benchmarks/train_mfu.py --attention cudnn,xla --remat minimal,full   # a table of every pair

Builds `Trainer` from the experiment config (bf16 compute, fp32 params and AdamW, layers scanned
with the config's remat policy, the LM head on 64-position chunks of targets) and times the program
`Trainer.train_step` runs, compiled once and fed one batch kept on the device, on packed synthetic
rows shaped like the pretraining batch: `--rows` rows of `seq_len` tokens, each holding
`--images_per_row` examples of [<s> <image> 64 slots </image> caption </s>] with `--caption_tokens`
caption tokens (the loss targets), and `--max_images` image slots per row (the config's
`pack_max_images`). With `train.compact_images` (the default) the vision tower runs on the real
images only, in blocks of a quarter of the slots (train/image_slots.py); `--no_compact` runs it on
every slot, empty ones included.

Model FLOPs count the useful work once (`train_flops`): the vision tower and resampler on the real
images, the decoder on every position (attention over the whole row, as computed), the LM head on
the targets only; the backward as twice the forward. Remat recomputation, empty image slots and
padding are not model FLOPs: they show in the hardware FLOPs XLA reports for the compiled step
(`cost_analysis`), printed beside them. MFU = model FLOPs / step time / the chip's peak (dense
bf16; `--peak_tflops` for chips not in PEAK_TFLOPS).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)  # runs from a checkout without `pip install -e .` (e.g. on a lent GPU machine)
sys.path.insert(0, os.path.join(REPO, "experiments"))

from kosmos2_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES  # noqa: E402
from kosmos2_jax.train.flops import PEAK_TFLOPS, forward_flops, peak_tflops, train_flops  # noqa: E402,F401

def packed_batch(config, rows: int, seq_len: int, images_per_row: int, max_images: int, caption_tokens: int,
                 rng: np.random.Generator) -> tuple[dict, int]:
    """Synthetic packed rows in the input pipeline's layout (`data/packing.py`) and their target count."""
    from kosmos2_jax.data.packing import pack_row

    q, size = config.latent_query_num, config.vision.image_size
    length = 4 + q + caption_tokens
    if images_per_row * length > seq_len or images_per_row > max_images:
        raise ValueError(f"{images_per_row} examples of {length} tokens do not fit a row of {seq_len} tokens "
                         f"and {max_images} image slots")
    vocab = config.text.vocab_size
    out = []
    for _ in range(rows):
        examples = []
        for _ in range(images_per_row):
            ids = np.full(seq_len, config.text.pad_token_id, np.int32)
            ids[:length] = rng.integers(4, vocab, length)
            ids[0], ids[length - 1] = config.text.bos_token_id, config.text.eos_token_id
            img = np.zeros(seq_len, np.int32)
            img[2:2 + q] = 1
            loss = np.zeros(seq_len, np.int32)
            loss[3 + q:length] = 1  # the caption and </s>
            examples.append({"input_ids": ids, "attention_mask": (np.arange(seq_len) < length).astype(np.int32),
                             "loss_mask": loss, "image_embeds_position_mask": img, "has_image": True,
                             "pixel_values": rng.integers(0, 256, (size, size, 3), dtype=np.uint8)})
        out.append(pack_row(examples, seq_len, max_images, config.text.pad_token_id))
    batch = {k: np.stack([r[k] for r in out]) for k in out[0]}
    return batch, int(batch["loss_mask"][:, 1:].sum())


def tiny(cfg):
    """A seconds-scale variant of the config (same code paths: bf16, scan, remat, packing)."""
    cfg.model.vision.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=56)
    cfg.model.text.update(vocab_size=2048, embed_dim=64, layers=2, ffn_dim=128, attention_heads=4, dropout=0.0,
                          attention_dropout=0.0)
    cfg.model.latent_query_num = 8
    cfg.data.seq_len = 128
    cfg.num_location_tokens = 64
    return cfg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="kosmos2_pretrain", help="a module in experiments/")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--images_per_row", type=int, default=12)
    parser.add_argument("--caption_tokens", type=int, default=100)
    parser.add_argument("--max_images", type=int, default=None, help="image slots per row (default: the config's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after 2 untimed ones")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the chip's dense bf16 peak")
    parser.add_argument("--attention", default=None,
                        help=f"model.attention_impl, or several joined by commas to compare them "
                             f"({', '.join(ATTENTION_IMPLS)}; default: the config's); not 'einsum' sets attention dropout to 0")
    parser.add_argument("--no_compact", action="store_true",
                        help="train.compact_images=False: the vision tower on every image slot, empty ones included")
    parser.add_argument("--remat", default=None,
                        help=f"model.remat_policy, or several joined by commas (e.g. {', '.join(REMAT_POLICIES)}, any "
                             f"jax.checkpoint_policies name, save:NAME+NAME; default: the config's)")
    parser.add_argument("--xla_gpu_preset", default="training", help="XLA flags added on NVIDIA GPUs "
                        "(kosmos2_jax.utils.cli.GPU_XLA_PRESETS: training, none), as `train` adds them")
    parser.add_argument("--freeze", default=None, help="train.freeze (none, vision_except_last, all_but_resampler; "
                        "default: the config's): the step and the optimizer state then cover the trained part only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config value, e.g. --set model.vision.num_hidden_layers=12 (repeatable; applied last)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, for a CPU smoke run")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="after timing, trace --profile_steps more steps to DIR (TensorBoard/Perfetto) "
                             "and print where the time goes (kosmos2_jax/train/profiling.py)")
    parser.add_argument("--profile_steps", type=int, default=3)
    args = parser.parse_args(argv)
    from kosmos2_jax.utils import cli

    added = cli.use_gpu_xla_flags(args.xla_gpu_preset)  # before JAX starts its backend
    if added:
        print(f"XLA flags added ({args.xla_gpu_preset}): {' '.join(added)}", flush=True)
    attentions = args.attention.split(",") if args.attention else [None]
    remats = args.remat.split(",") if args.remat else [None]
    results = [dict(run_one(args, attention, remat), attention=attention, remat=remat)
               for attention in attentions for remat in remats]
    if len(results) > 1:
        print("\n| attention | remat | step s | tokens/s | MFU |\n|---|---|---|---|---|")
        for r in results:
            print(f"| {r['attention_impl']} | {r['remat_policy']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['mfu']} |")
    return results if len(results) > 1 else results[0]


def run_one(args, attention, remat):
    import importlib

    from kosmos2_jax.models import Kosmos2
    from kosmos2_jax.models import sharding
    from kosmos2_jax.train import loop
    from kosmos2_jax.train.trainer import Trainer, model_config

    cfg = importlib.import_module(args.config).get_config()
    if args.tiny:
        cfg = tiny(cfg)
        args.images_per_row, args.caption_tokens = min(args.images_per_row, 3), min(args.caption_tokens, 20)
    if attention:
        cfg.model.attention_impl = attention
    if remat:
        cfg.model.remat_policy = remat
    if args.no_compact:
        cfg.train.compact_images = False
    if args.freeze:
        cfg.train.freeze = args.freeze
    for item in args.set:
        key, _, text = item.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        try:
            node[leaf] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            node[leaf] = text
    if cfg.model.attention_impl != "einsum":  # jax.nn.dot_product_attention has no dropout
        cfg.model.text.attention_dropout = cfg.model.vision.attention_dropout = 0.0
    config = model_config(cfg, cfg.model.text.vocab_size)
    seq_len, max_images = cfg.data.seq_len, args.max_images or cfg.data.pack_max_images
    batch, targets = packed_batch(config, args.rows, seq_len, args.images_per_row, max_images, args.caption_tokens,
                                  np.random.default_rng(0))
    device = jax.devices()[0]
    print(f"{args.config}{' (tiny)' if args.tiny else ''}: {args.rows} rows x {seq_len} tokens, "
          f"{args.images_per_row} images in {max_images} slots per row, {targets} targets; "
          f"{config.dtype} compute, remat {config.remat_policy}, scan {config.scan_layers}, "
          f"attention {config.attention_impl} (dropout {config.text.attention_dropout}), "
          f"loss {cfg.train.loss_impl} (chunk {cfg.train.loss_chunk}); {jax.device_count()} x {device.device_kind}", flush=True)

    start = time.perf_counter()
    trainer = Trainer(Kosmos2(config), cfg, config.text.vocab_size - cfg.num_location_tokens, cfg.num_location_tokens,
                      train_step=loop.train_step)
    print(f"init {time.perf_counter() - start:.1f}s", flush=True)
    total, trained = trainer.parameter_counts()
    opt_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(trainer.state["opt_state"]))
    print(f"freeze {cfg.train.freeze}: {trained:,} of {total:,} parameters trained; optimizer state "
          f"{opt_bytes / 2**20:,.1f} MiB", flush=True)
    with jax.set_mesh(trainer.mesh), sharding.logical_axis_rules(trainer.rules):
        on_device = trainer._put(batch)  # one batch, kept on the device: this times the step, not the input
        print(f"vision tower on {trainer.image_slots} images per step ({args.rows * args.images_per_row} real, "
              f"{args.rows * max_images} slots)", flush=True)
        start = time.perf_counter()
        compiled = trainer._step_fn.lower(trainer.state, on_device).compile()  # the program train_step runs
        print(f"compile {time.perf_counter() - start:.1f}s", flush=True)
        hardware = None
        try:  # best-effort: not every backend reports costs
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            hardware = float(cost["flops"]) if cost and "flops" in cost else None
        except Exception as e:
            print(f"(no XLA cost analysis: {type(e).__name__}: {e})")
        def one_step():
            trainer.state, out = compiled(trainer.state, on_device)
            return jax.block_until_ready(out)

        times = []
        for _ in range(args.steps + 2):
            start = time.perf_counter()
            metrics = one_step()
            times.append(time.perf_counter() - start)
        summary = None
        if args.profile:
            from kosmos2_jax.train import profiling

            profiling.trace(one_step, args.profile_steps, args.profile)
            summary = profiling.summarize(args.profile, compiled.as_text(), args.profile_steps)
    times = times[2:]  # the first two warm up
    step = float(np.median(times))
    loss = float(metrics["nll_sum"] / max(float(metrics["tokens"]), 1.0))
    images = args.rows * args.images_per_row
    model = train_flops(config, args.rows, seq_len, images, targets)
    tokens = args.rows * seq_len
    peak = args.peak_tflops or peak_tflops(device)
    chips = jax.device_count()
    print(f"| step (median of {args.steps}) | tokens/s | model TFLOP/step | model TFLOP/s per chip | MFU | "
          f"XLA TFLOP/step (HFU) |\n|---|---|---|---|---|---|")
    achieved = model / step / chips / 1e12
    mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a (peak unknown: --peak_tflops)"
    hfu = "n/a"
    if hardware and hardware < model:  # XLA:GPU leaves the cuBLAS/cuDNN custom calls out of its count
        hfu = f"n/a (XLA counts {hardware / 1e12:.3g}, not the library calls)"
    elif hardware:
        hfu = f"{hardware / 1e12:.4g}" + (f" ({100 * hardware / step / chips / 1e12 / peak:.1f}%)" if peak else "")
    print(f"| {step:.3f} s | {tokens / step:,.0f} | {model / 1e12:.4g} | {achieved:.4g} | {mfu} | {hfu} |")
    print(f"loss {loss:.4f}; step times {', '.join(f'{t:.3f}' for t in times)}")
    stats = device.memory_stats() or {}  # accelerators report it; the CPU does not
    if "peak_bytes_in_use" in stats:
        print(f"peak device memory {stats['peak_bytes_in_use'] / 2**30:.1f} GiB of "
              f"{stats.get('bytes_limit', 0) / 2**30:.1f} GiB")
    if summary:
        print(f"\nprofile of {args.profile_steps} steps in {args.profile}:\n"
              + profiling.format_summary(summary, step))
    return {"step_s": step, "tokens_per_s": tokens / step, "model_flops": model, "hardware_flops": hardware,
            "loss": loss, "profile": summary, "mfu": mfu, "attention_impl": config.attention_impl,
            "remat_policy": config.remat_policy, "optimizer_state_bytes": opt_bytes, "trained_parameters": trained}


if __name__ == "__main__":
    main()
