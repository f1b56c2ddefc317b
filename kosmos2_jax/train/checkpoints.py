"""Train-state checkpoints and preemption: an Orbax CheckpointManager holding the train state and
every data shard's pipeline position, and SIGTERM turned into "save this step and stop" (on every
process at the same step)."""

from __future__ import annotations

import os
import signal
import time

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from kosmos2_jax.utils import multihost
from kosmos2_jax.utils.errors import UsageError


class DamagedCheckpoint(UsageError):
    """A checkpoint step that cannot be read (a kill mid-write of a non-atomic store, a lost file)."""


class Checkpoints:
    """Orbax CheckpointManager over `workdir/checkpoints`: the train state plus the data state (JSON).

    The data state is one input-pipeline position per data shard (`{"shards": S, "states": [...]}`,
    `train.data_shards`): each process reads its own shards, so each resumes at its own place (with
    packing, hosts consume different numbers of examples per step). Saving is collective."""

    def __init__(self, workdir: str, every: int, keep: int, async_save: bool = True):
        path = os.path.join(os.path.abspath(workdir), "checkpoints")
        try:
            os.makedirs(path, exist_ok=True)
            if jax.process_index() == 0:  # processes sharing one folder would race on the probe
                probe = os.path.join(path, ".write_test")
                open(probe, "w").close()
                os.remove(probe)
        except OSError as e:
            raise UsageError(f"workdir {workdir!r} is not writable: {e}") from None
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(path, options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, local_data_states, force: bool = False) -> bool:
        """`local_data_states`: a callable -> this process's shard states, in shard order (called, and
        gathered from every process, only when this step is saved)."""
        if not (force or self.manager.should_save(step)):
            return False
        states = [s for per_process in multihost.allgather_json(local_data_states()) for s in per_process]
        data = {"shards": len(states), "states": states}
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               data=ocp.args.JsonSave(data)), force=force)

    def committed(self, step: int) -> bool:
        """Whether `step` is on disk for good (after `wait`: an async save may still be writing)."""
        self.manager.reload()
        return step in self.manager.all_steps()

    def data_states(self, step: int) -> list[dict]:
        """The saved pipeline position of every data shard (an old checkpoint's single state is one shard)."""
        try:
            data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        except Exception as e:  # Orbax raises many types for damaged files
            raise DamagedCheckpoint(self._damaged(step, e)) from e
        return data["states"] if "states" in data else [data]

    def restore(self, step: int, abstract_state):
        """The train state of `step` (its data states: `data_states`)."""
        from kosmos2_jax.utils.cli import fd2_silenced

        try:
            with fd2_silenced():  # a failed restore's reads keep printing tracebacks from other threads
                return self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as e:
            raise DamagedCheckpoint(self._damaged(step, e)) from e

    def _damaged(self, step: int, error: Exception) -> str:
        others = [s for s in sorted(self.manager.all_steps()) if s != step]
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(" [tensorstore_spec")[0][:400]
        earlier = [s for s in others if s < step]
        hint = (f"; if it is damaged, resume from step {earlier[-1]} with --config.train.resume_step={earlier[-1]}"
                if earlier else "")
        return (f"the checkpoint of step {step} ({self.manager.directory / str(step)}) cannot be restored: {reason} "
                f"(other steps: {others or 'none'}){hint}")

    def set_aside(self, step: int) -> str:
        """Move a damaged step out of the manager's folder (to WORKDIR/damaged_checkpoints/STEP), so
        the run resumes from the one before and may save this step again. Collective."""
        where = os.path.join(os.path.dirname(str(self.manager.directory)), "damaged_checkpoints", str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(where), exist_ok=True)
            if os.path.exists(where):
                where = f"{where}.{int(time.time())}"
            os.rename(str(self.manager.directory / str(step)), where)
        multihost.sync(f"set_aside:{step}")
        self.manager.reload()
        return where

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


class Preemption:
    """SIGTERM or Ctrl-C (SIGINT) -> the run saves and exits cleanly; a second Ctrl-C stops at once.
    With one process, a flag the loop checks; with several, JAX's preemption sync manager (started
    by `jax.distributed.initialize`): a SIGTERM to any process makes `stop(step)` true on every
    process at the same step (Ctrl-C keeps its default there)."""

    def __init__(self):
        self.requested, self.why = False, "SIGTERM"
        self._synced = jax.process_count() > 1
        self._old = {}
        if not self._synced:  # a Python handler would replace the sync manager's own
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            print("Ctrl-C: saving the next step's checkpoint, then exiting (Ctrl-C again: stop now, unsaved)",
                  flush=True)
            self.why = "Ctrl-C"
        self.requested = True

    def stop(self, step: int) -> bool:
        """Collective with several processes: call it once per step, on every process."""
        if self._synced:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
