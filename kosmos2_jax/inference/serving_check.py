"""Size a serving slice before renting it: the accelerator mode's generation programs compiled
ahead of time for one chip of a TPU slice this machine does not have (libtpu describes it), and
their memory against the chip's HBM.

    python -m kosmos2_jax.predict --compile_only --topology v5e-4 --batch_size 64 --max_new_tokens 128

Each chip serves its own replica of the model (a slice of N chips answers N batches at once), so
the check compiles for one chip: the prefill (vision tower, resampler, every decoder layer) and the
decoding program (`tokens_per_call` steps, the KV cache donated). Per chip it reports the params,
the KV cache and the programs' temporaries, the peak of the two programs against HBM, and the
largest batch that fits, extrapolated from the requested batch (at least 4) and half of it (memory is linear in the
batch; a single row's program may be laid out differently) and not compiled itself.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from kosmos2_jax.inference.generate import _Settings, bucket_length, compile_fused
from kosmos2_jax.models import Kosmos2, sharding
from kosmos2_jax.utils.errors import UsageError
from kosmos2_jax.utils.tpu import topology_devices

GIB = 2 ** 30


def program_memory(model: Kosmos2, abstract_params, settings: _Settings, batch: int, prompt_len: int, device,
                   mesh=None) -> dict:
    """Bytes per chip of the accelerator mode's programs for `batch` prompts of `prompt_len`
    tokens, one image each, compiled for `device`, or sharded over `mesh` (the training rules)."""
    if mesh is None:
        on = jax.sharding.SingleDeviceSharding(device)
        places = jax.tree_util.tree_map(lambda _: on, abstract_params)
    else:
        on = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        places = sharding.tree_shardings(sharding.logical_params(model), mesh)
    params = jax.tree_util.tree_map(lambda x, place: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place),
                                    abstract_params, places)
    size = model.config.vision.image_size
    prefill, decode = compile_fused(model, settings, batch, prompt_len, True, params, (batch, size, size, 3),
                                    ((2,), np.uint32), sharding=on, mesh=mesh)
    memory = [c.memory_analysis() for c in (prefill, decode)]
    # bytes on one device: a sharded array's shard (the KV cache as the decoding program takes it)
    on_device = lambda shapes, places: sum(  # noqa: E731
        int(np.prod(place.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
        for x, place in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(places)))
    return {"params": on_device(params, places),
            "kv_cache": on_device(decode.args_info[0][2], decode.input_shardings[0][2]),
            "temporaries": max(m.temp_size_in_bytes for m in memory),
            "peak": max(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                        + m.temp_size_in_bytes + m.generated_code_size_in_bytes for m in memory)}


def check(model: Kosmos2, abstract_params, topology: str, batch_size: int, max_new_tokens: int,
          prompt_tokens: int = 96, num_beams: int = 1, tokens_per_call: int = 32, mesh_text: str = "",
          say=print) -> dict:
    """Compile the accelerator mode for one chip of `topology` and report its memory (see the module
    docstring); returns the numbers (GiB)."""
    if batch_size < 1 or max_new_tokens < 1:
        raise UsageError(f"--batch_size and --max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    devices, described, hbm_gib = topology_devices(topology)
    mesh = None
    if mesh_text:  # one replica over the mesh's first devices
        sizes = sharding.mesh_shape_from_text(mesh_text).values()
        wanted = len(devices) if -1 in sizes else math.prod(sizes)
        if wanted > len(devices):
            raise UsageError(f"--mesh {mesh_text}: needs {wanted} devices, {topology} has {len(devices)}")
        mesh = sharding.mesh_from_text(mesh_text, devices[:wanted])
    prompt_len = bucket_length(max(prompt_tokens, model.config.latent_query_num + 2), 8)
    if prompt_len + max_new_tokens > model.config.text.max_position_embeddings:
        raise UsageError(f"a {prompt_len}-token prompt + --max_new_tokens {max_new_tokens} exceeds the model's "
                         f"{model.config.text.max_position_embeddings} positions")
    settings = _Settings(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, temperature=1.0,
                         top_p=1.0, no_repeat_ngram_size=3, eos_token_id=2, pad_token_id=1, length_penalty=1.0,
                         decode_mode="fused", tokens_per_call=tokens_per_call)
    replica = (f"one model replica per {mesh.devices.size} devices (mesh "
               f"{' '.join(f'{k}={v}' for k, v in mesh.shape.items())})" if mesh else "one model replica per device")
    say(f"{topology}: {len(devices)} devices ({devices[0].device_kind}, libtpu {described}), {hbm_gib:.1f} GiB HBM "
        f"each; {replica}; batch {batch_size} x ({prompt_len}-token prompt with one image + "
        f"{max_new_tokens} new tokens), {num_beams} beam(s), {tokens_per_call} tokens per call")
    start = time.time()
    g = lambda n: n / GIB  # noqa: E731
    memory = lambda rows: program_memory(model, abstract_params, settings, rows, prompt_len, devices[0], mesh)  # noqa: E731
    try:
        wanted = memory(batch_size)
    except jax.errors.JaxRuntimeError as e:  # XLA refuses a program larger than the chip's HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        wanted = None
        say(f"per device: DOES NOT FIT: {str(e).split('RESOURCE_EXHAUSTED: ')[-1].splitlines()[0]}")
    # two batch sizes that compile give the memory a row adds
    probe = max(batch_size if wanted else min(8, batch_size // 2), 4)
    first = wanted if probe == batch_size and wanted else memory(probe)
    half = memory(probe // 2)
    seconds = time.time() - start
    per_row = (first["peak"] - half["peak"]) / (probe - probe // 2)
    fixed = first["peak"] - per_row * probe
    largest = int((hbm_gib * GIB - fixed) // per_row) if per_row > 0 else None
    fits = wanted is not None and wanted["peak"] <= hbm_gib * GIB
    if wanted:
        say(f"per device: params {g(wanted['params']):.2f} GiB, KV cache {g(wanted['kv_cache']):.2f} GiB, temporaries "
            f"{g(wanted['temporaries']):.2f} GiB; peak {g(wanted['peak']):.2f} GiB of {hbm_gib:.1f} GiB: "
            f"{'fits' if fits else 'DOES NOT FIT'}")
    replicas, unit = (len(devices) // mesh.devices.size, "replica") if mesh else (len(devices), "device")
    say(f"largest batch that fits: about {largest} per {unit} ({replicas} x {largest} on the slice; linear "
        f"from batches {probe // 2} and {probe}: {g(per_row) * 1024:.1f} MiB a row); compiled in {seconds:.0f} s")
    shown = wanted or first
    return {"topology": described, "devices": len(devices), "hbm_gib": hbm_gib, "batch_size": batch_size,
            "prompt_len": prompt_len, "params_gib": g(shown["params"]), "kv_cache_gib": g(shown["kv_cache"]) if wanted else None,
            "temporaries_gib": g(shown["temporaries"]) if wanted else None, "peak_gib": g(shown["peak"]) if wanted else None,
            "fits": fits, "largest_batch": largest, "compile_s": seconds}
