"""Several processes (`jax.distributed`): start-up, host-side gathers, and who does which share.

Every function here is collective where it says so: all processes must call it, in the same order.
With one process each one is a cheap no-op, so callers never branch on the process count.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np

from kosmos2_jax.utils.errors import UsageError


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """`jax.distributed.initialize`: automatic on TPU / Slurm / Open MPI when the arguments are
    left empty; give all three elsewhere (e.g. several CPU processes on one machine, where the
    cross-process collectives run over gloo). It also starts JAX's preemption sync manager, which
    `train.trainer.Preemption` uses to stop all processes at the same step."""
    if coordinator_address and (num_processes < 1 or not 0 <= process_id < num_processes):
        raise UsageError(f"coordinator_address {coordinator_address!r} needs num_processes >= 1 and "
                         f"0 <= process_id < num_processes, got num_processes={num_processes}, process_id={process_id}")
    try:  # CPU devices need a collectives backend across processes; GPU / TPU ignore this flag
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a JAX without the flag
        pass
    kwargs = {}
    if coordinator_address:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)


def is_primary() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Collective: wait until every process got here (a barrier named `name`)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_json(value: Any) -> list:
    """Collective: every process's JSON-able `value`, in process order, on every process."""
    if jax.process_count() == 1:
        return [json.loads(json.dumps(value))]
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:blob.size] = blob
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(row[:n].tobytes().decode()) for row, n in zip(gathered, lengths)]


def allgather_int(value: int) -> list[int]:
    """Collective: every process's integer, in process order."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int64(value))).reshape(-1)]


def to_host_local(tree: Any) -> Any:
    """Collective: a tree of (possibly process-spanning) global arrays -> the same values on this
    process's first device, for host-local work such as generation during evaluation (one device
    on any process count, so the numbers do not depend on it)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, jax.local_devices()[0])
    from jax.experimental import multihost_utils

    full = multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_put(full, jax.local_devices()[0])


def batch_share(num_items: int, batch_size: int, index: int | None = None, count: int | None = None) -> list[int]:
    """Indices of the items this process handles when `num_items` items are cut into batches of
    `batch_size` (as one process would cut them) and the batches are dealt out round-robin: every
    batch is the one a single process would run, so the results do not depend on the process count."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return [i for b in range(index, -(-num_items // batch_size), count)
            for i in range(b * batch_size, min((b + 1) * batch_size, num_items))]


def merge_shares(shares: Sequence[Sequence[Any]], num_items: int, batch_size: int) -> list:
    """The inverse of `batch_share`: each process's results (in its share's order) -> all results in item order."""
    out = [None] * num_items
    for index, share in enumerate(shares):
        for i, value in zip(batch_share(num_items, batch_size, index, len(shares)), share):
            out[i] = value
    return out
