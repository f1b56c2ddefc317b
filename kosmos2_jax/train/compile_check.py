"""Compile-only check of a training config for a TPU slice this machine does not have.

    python -m kosmos2_jax.train --config experiments/kosmos2_pretrain.py --compile_only --topology v5p-128 \\
        [--config.train.batch_size=256 ...]

libtpu describes the slice (`jax.experimental.topologies.get_topology_desc`; `pip install
libtpu==0.0.42.1` for jax 0.10.2 — no TPU needed), the trainer's real step is lowered with abstract
state and batch (`jax.ShapeDtypeStruct`s carrying the config's shardings) on the slice's devices and
compiled ahead of time. It reports per-device memory against the chip's HBM, how every parameter is
sharded (and why one stays replicated), and XLA's FLOP count against the model's.

The batch is the worst case: `train.batch_size` full rows of `data.seq_len` tokens with every image
slot filled (no image compaction). XLA's `cost_analysis()` counts a scanned loop's body once, so
with `model.scan_layers` its FLOPs are far below the model's; the ratio is printed, not judged.
GPU clusters: JAX cannot describe GPU devices without the GPUs, so this check is TPU-only.
"""

from __future__ import annotations

import copy
import math
import re
import time

import jax
import numpy as np
import flax.linen as nn
from flax import traverse_util

from kosmos2_jax.models import sharding
from kosmos2_jax.train.flops import attention_kernel_flops, train_flops
from kosmos2_jax.utils.errors import UsageError
from kosmos2_jax.utils.tpu import chip_count, topology_devices

def abstract_batch(cfg, config, batch_sharding) -> dict:
    """The largest batch the config's pipeline makes: `batch_size` rows x `seq_len`, every image slot filled."""
    rows, seq_len, size = cfg.train.batch_size, cfg.data.seq_len, config.vision.image_size
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    batch = {k: spec((rows, seq_len), np.int32)
             for k in ("input_ids", "attention_mask", "loss_mask", "image_embeds_position_mask")}
    if cfg.data.pack:
        batch["pixel_values"] = spec((rows, cfg.data.pack_max_images, size, size, 3), np.uint8)
        batch["segment_ids"] = spec((rows, seq_len), np.int32)
    else:
        batch["pixel_values"] = spec((rows, size, size, 3), np.uint8)
    return batch


def sharding_table(trainer) -> list[tuple[str, tuple, str, str]]:
    """(parameter, shape, PartitionSpec, why it stays replicated or '') for every parameter."""
    rules, mesh = dict(trainer.rules), trainer.mesh
    # (QLoRA's quantized kernels are trees of arrays: `.../kernel/array/qvalue`, `.../array/scale`)
    boxed = jax.tree_util.tree_flatten_with_path(trainer.logical_params,
                                                 is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    specs = jax.tree_util.tree_leaves(trainer.state_shardings["params"])
    out = []
    for (keys, leaf), sharded in zip(boxed, specs):
        path = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)
        shape = tuple(leaf.value.shape) if isinstance(leaf, nn.LogicallyPartitioned) else tuple(leaf.shape)
        names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else (None,) * len(shape)
        spec = sharded.spec
        why = ""
        if all(s is None for s in spec):
            reasons = []
            for dim, name in zip(shape, names):
                axes = rules.get(name) if name else None
                axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
                axes = tuple(a for a in axes if mesh.shape[a] > 1)
                if axes:
                    size = math.prod(mesh.shape[a] for a in axes)
                    reasons.append(f"{name}={dim} not divisible by {'x'.join(axes)}={size}")
            why = "; ".join(reasons) or "its axes are not sharded on this mesh (" + ", ".join(
                str(n) for n in names) + ")"
        out.append(("/".join(path), shape, str(spec), why))
    return out


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}


def cross_slice_collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """The collectives of a multi-slice program that cross slices -> {kind: (count, bytes each
    device sends per step)}. Inside a slice a collective is an HLO op with its replica groups; what
    crosses the data-center network is lowered to host transfers handled by the megascale runtime,
    each named after the collective it carries (`_xla_host_transfer_rendezvous="all-reduce.1_0"`)."""
    found: dict[str, list] = {}
    for line in hlo_text.splitlines():
        if " send(" not in line or "xla_megascale_runtime" not in line:
            continue
        name = re.search(r'_xla_host_transfer_rendezvous="([^"]+)"', line)
        shape = re.search(r"= \((\w+)\[([\d,]*)\]", line)
        if not name or not shape:
            continue
        count = math.prod(int(n) for n in shape.group(2).split(",") if n) if shape.group(2) else 1
        kind = re.sub(r"[.\d_]+$", "", name.group(1).split(".")[0])
        entry = found.setdefault(kind, [set(), 0])
        entry[0].add(name.group(1))
        entry[1] += count * _DTYPE_BYTES.get(shape.group(1), 4)
    return {kind: (len(names), nbytes) for kind, (names, nbytes) in found.items()}


# peak dense bf16 TFLOP/s per chip (Cloud TPU system architecture pages)
PEAK_BF16_TFLOPS = {"v4": 275, "v5e": 197, "v5p": 459, "v6e": 918}


def _optimal_seconds(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    seconds = float((cost or {}).get("optimal_seconds", -1.0))
    return seconds if seconds > 0 else None


def layer_extrapolated(estimate, vision_layers: int, text_layers: int, frozen_vision: int = 0) -> float | None:
    """`estimate(vision_layers, text_layers)` (seconds, or None) at 1 and 2 layers a tower ->
    its linear extrapolation to the given layer counts: t(1, 1) + (V - 1) x the second vision
    layer's cost + (T - 1) x the second text layer's. (Frozen vision layers would cost less than
    the measured trained one: then no estimate.)"""
    if frozen_vision:
        return None
    base, vision, text = estimate(1, 1), estimate(2, 1), estimate(1, 2)
    if None in (base, vision, text):
        return None
    return base + (vision_layers - 1) * (vision - base) + (text_layers - 1) * (text - base)


def pallas_kernels(hlo_text: str) -> int:
    """Pallas (Mosaic) kernels in a compiled TPU program. XLA's cost model sees only their operands'
    bytes: a kernel that declares no `pl.CostEstimate` (splash attention in jax 0.10.2) gets no
    FLOPs and almost no time in `optimal_seconds`."""
    return hlo_text.count('custom_call_target="tpu_custom_call"')


def twins_estimate(cfg, config, vocab: int, batch, devices, train_step) -> float | None:
    """XLA's step time for `cfg` (its model: `config`) from three twins with unrolled layers and the
    plain loss, 1 or 2 layers a tower, extrapolated linearly to the config's layers
    (`layer_extrapolated`). The cost model counts a scanned stack's body once and gives no time for
    the chunked loss's loop (a negative one), and compiling the full model unrolled takes tens of
    minutes here; the plain loss's LM head runs on every position, no faster than the chunked one."""
    from kosmos2_jax.models import Kosmos2
    from kosmos2_jax.train.trainer import Trainer, model_config

    def estimate(vision_layers, text_layers):
        twin = copy.deepcopy(cfg)
        with twin.unlocked():
            twin.model.update(scan_layers=False)
            twin.model.vision.num_hidden_layers, twin.model.text.layers = vision_layers, text_layers
            twin.train.loss_impl = "plain"
        small = Trainer(Kosmos2(model_config(twin, vocab)), twin, vocab - cfg.num_location_tokens,
                        cfg.num_location_tokens, abstract=True, devices=devices, train_step=train_step)
        with jax.set_mesh(small.mesh), sharding.logical_axis_rules(small.rules):
            return _optimal_seconds(small._step_fn.lower(small.state, batch).compile())

    return layer_extrapolated(estimate, config.vision.num_hidden_layers, config.text.layers,
                              frozen_vision=config.frozen_vision_layers)


def check(cfg, topology: str, train_step=None, num_slices: int = 1) -> dict:
    """AOT-compile the config's init-free train step (train/loop.py's, or the `train_step` given)
    for `topology` (`num_slices` of them joined by the data-center network) and print the report."""
    from kosmos2_jax.models import Kosmos2
    from kosmos2_jax.train.trainer import Trainer, model_config

    if train_step is None:
        from kosmos2_jax.train.loop import train_step

    devices, described, hbm_gib = topology_devices(topology, num_slices)
    if num_slices > 1:  # data-parallel across the slices
        if cfg.mesh.dcn_data not in (1, num_slices):
            raise UsageError(f"config.mesh.dcn_data={cfg.mesh.dcn_data} with --num_slices {num_slices}: give "
                             f"--config.mesh.dcn_data={num_slices} (or leave it 1: it is set from --num_slices)")
        cfg.mesh.dcn_data = num_slices
    vocab = cfg.model.text.vocab_size
    if vocab == -1:
        from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer

        vocab = Kosmos2Tokenizer.from_file(cfg.tokenizer, num_location_tokens=cfg.num_location_tokens).vocab_size
    config = model_config(cfg, vocab)
    if config.attention_impl == "cudnn":
        raise UsageError("model.attention_impl=cudnn is GPU-only: compile for a TPU with einsum or xla")
    model = Kosmos2(config)
    trainer = Trainer(model, cfg, vocab - cfg.num_location_tokens, cfg.num_location_tokens, abstract=True,
                      devices=devices, train_step=train_step)
    batch_devices = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
    if cfg.train.batch_size % (batch_devices * cfg.train.grad_accum_steps):
        raise UsageError(f"train.batch_size={cfg.train.batch_size} is not divisible by data x fsdp = {batch_devices} "
                         f"devices x grad_accum_steps={cfg.train.grad_accum_steps}: try "
                         f"--config.train.batch_size={2 * batch_devices * cfg.train.grad_accum_steps}")
    batch = abstract_batch(cfg, config, trainer.batch_sharding)
    mesh = " ".join(f"{k}={v}" for k, v in trainer.mesh.shape.items())
    if num_slices > 1:
        mesh += f" (data = {num_slices} slices x {trainer.mesh.shape['data'] // num_slices})"
    print(f"{topology}: {len(devices)} devices ({devices[0].device_kind}, libtpu {described}), "
          f"{hbm_gib:.1f} GiB HBM each; mesh {mesh}; batch {cfg.train.batch_size} x {cfg.data.seq_len}", flush=True)
    t0 = time.time()
    with jax.set_mesh(trainer.mesh), sharding.logical_axis_rules(trainer.rules):
        try:
            compiled = trainer._step_fn.lower(trainer.state, batch).compile()
        except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program larger than the chip's HBM
            needed = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
            if "RESOURCE_EXHAUSTED" not in str(e) or not needed:
                raise
            print(f"per device: temporaries {float(needed.group(1)):.2f} GiB, more than the {needed.group(2)} GiB "
                  f"of HBM XLA leaves them: DOES NOT FIT (XLA refused to compile it)", flush=True)
            return {"topology": described, "devices": len(devices), "mesh": dict(trainer.mesh.shape), "fits": False,
                    "temporaries_gib": float(needed.group(1)), "hbm_gib": hbm_gib, "num_slices": num_slices}
    seconds = time.time() - t0
    mem = compiled.memory_analysis()
    gib = lambda n: n / 2 ** 30
    arguments, outputs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    aliased, temporaries = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    total = arguments + outputs - aliased + temporaries + mem.generated_code_size_in_bytes
    fits = total <= hbm_gib * 2 ** 30
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    slots = cfg.data.pack_max_images if cfg.data.pack else 1
    rows = cfg.train.batch_size
    model_flops = train_flops(config, rows, cfg.data.seq_len, rows * slots, rows * cfg.data.seq_len) / len(devices)
    table = sharding_table(trainer)
    width = max(len(name) for name, *_ in table)
    print("parameter".ljust(width), "shape".ljust(22), "sharding")
    for name, shape, spec, why in table:
        print(name.ljust(width), str(shape).ljust(22), spec + (f"   replicated: {why}" if why else ""))
    replicated = sum(1 for *_, why in table if why)
    print(f"{replicated} of {len(table)} parameters replicated", flush=True)
    hlo = compiled.as_text()
    crossing = cross_slice_collectives(hlo) if num_slices > 1 else {}
    if num_slices > 1:
        listed = "; ".join(f"{kind} x {n} ({nbytes / 2 ** 20:.1f} MiB sent per device per step)"
                           for kind, (n, nbytes) in sorted(crossing.items())) or "none"
        print(f"collectives crossing the {num_slices} slices (data-center network): {listed}", flush=True)
    print(f"per device: arguments {gib(arguments):.2f} GiB, outputs {gib(outputs):.2f} GiB "
          f"({gib(aliased):.2f} GiB donated, aliased), temporaries {gib(temporaries):.2f} GiB, "
          f"total {gib(total):.2f} GiB of {hbm_gib:.1f} GiB: {'fits' if fits else 'DOES NOT FIT'}")
    kernels = pallas_kernels(hlo)
    print(f"compiled in {seconds:.0f} s; XLA counts {xla_flops / 1e12:.2f} TFLOP per device per step, the model "
          f"{model_flops / 1e12:.2f} (ratio {xla_flops / max(model_flops, 1):.2f}"
          + ("; a scanned stack's body is counted once" if config.scan_layers else "") + ")"
          + (f"; {kernels} Pallas kernels compiled for the chip" if kernels else ""), flush=True)
    # XLA's own cost model (TPU): the step's best-case time; from unrolled twins (`twins_estimate`)
    # where it cannot count the program itself. Multi-slice programs get no time at all.
    estimate = _optimal_seconds(compiled)
    twin_changes = {k: v for k, v, wanted in (("scan_layers", False, config.scan_layers),
                                              ("loss_impl", "plain", cfg.train.loss_impl == "chunked")) if wanted}
    if twin_changes and num_slices == 1:
        estimate = twins_estimate(cfg, config, vocab, batch, devices, train_step)
    mfu = kernel_s = None
    if estimate is None:
        print("XLA's estimate: none (its cost model reports no time for this program; multi-slice programs "
              "get none)", flush=True)
    else:
        peak = PEAK_BF16_TFLOPS[described.split(":")[0]] * 1e12 * chip_count(devices) / len(devices)
        if kernels:  # the kernels' FLOPs at the chip's peak: the least time they can add
            kernel_s = attention_kernel_flops(config, rows, cfg.data.seq_len, rows * slots) / len(devices) / peak
        mfu = model_flops / ((estimate + (kernel_s or 0.0)) * peak)
        print(f"XLA's estimate (its cost model, not a measurement): {estimate * 1e3:.4g} ms per step"
              + (f" + {kernel_s * 1e3:.3g} ms for the attention's FLOPs in the {kernels} Pallas kernels at the "
                 f"chip's peak (the cost model counts only their bytes) = {(estimate + kernel_s) * 1e3:.4g} ms"
                 if kernels else "")
              + f", {100 * mfu:.1f}% MFU against the chip's {peak / 1e12:.0f} bf16 TFLOP/s per device"
              + (f" (from unrolled twins of 1-2 layers a tower with the plain loss: "
                 f"{', '.join(f'{k}={v}' for k, v in twin_changes.items())} here)" if twin_changes else ""),
              flush=True)
    return {"topology": described, "devices": len(devices), "mesh": dict(trainer.mesh.shape), "num_slices": num_slices,
            "cross_slice": crossing, "estimated_step_s": estimate, "estimated_mfu": mfu,
            "pallas_kernels": kernels, "kernel_flops_at_peak_s": kernel_s,
            "hbm_gib": hbm_gib, "arguments_gib": gib(arguments), "outputs_gib": gib(outputs),
            "temporaries_gib": gib(temporaries), "total_gib": gib(total), "fits": fits, "compile_s": seconds,
            "xla_tflop": xla_flops / 1e12, "model_tflop": model_flops / 1e12, "replicated": replicated,
            "parameters": len(table)}
