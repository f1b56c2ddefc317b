"""Train from an experiment config.

    python -m kosmos2_jax.train --config experiments/shapes_tiny.py --workdir workdir/shapes_tiny \\
        [--config.train.steps=300 --config.mesh.data=2 ...]

    python -m kosmos2_jax.train --config experiments/kosmos2_pretrain.py --compile_only --topology v5p-128

Resumes automatically from the latest checkpoint in the workdir (train state and data position);
SIGTERM saves a checkpoint and exits; at the end the params are exported to WORKDIR/export
(a `convert.load_checkpoint` folder). TensorBoard logs go to WORKDIR/tb.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from kosmos2_jax.train.trainer import model_config  # noqa: F401  (tests and benchmarks import it from here)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, logs and the export go")
flags.DEFINE_bool("compile_only", False, "compile the train step for --topology and report memory and sharding; "
                  "trains nothing (train/compile_check.py)")
flags.DEFINE_string("topology", "", "with --compile_only: a TPU slice, e.g. v5p-128 or v5p:4x4x8 (needs libtpu)")
flags.mark_flags_as_required(["config"])


def write_run_config(workdir: str, cfg, model_config) -> None:
    import json

    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
        json.dump(model_config.to_dict(), f, indent=2)


def data_shards(cfg) -> int:
    """How many host shards the data is read as (`data.shards`, default: one per process). Each
    process reads `shards / processes` of them and concatenates their batches, so one machine can
    replay a pod's exact data order, and a checkpoint resumes on any process count dividing it."""
    import jax

    shards = cfg.data.get("shards", 0) or jax.process_count()
    if shards % jax.process_count():
        raise ValueError(f"data.shards={shards} is not a multiple of the {jax.process_count()} processes")
    if cfg.train.batch_size % shards:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by {shards} data shards "
                         f"(data.shards, default: one per process)")
    return shards


def data_pipelines(cfg, processor, shard_states=None):
    """(the training batches of this process's data shards, a function -> its validation batches)."""
    from kosmos2_jax.data.examples import ExampleConfig
    from kosmos2_jax.data.pipeline import HostShards, Pipeline, Source

    d = cfg.data
    example_config = ExampleConfig(seq_len=d.seq_len, preprocess=d.preprocess, span_mode=d.span_mode,
                                   score_threshold=d.score_threshold, grounded_prob=d.grounded_prob,
                                   box_formula=d.box_formula)
    sources = [Source("train", "grit", data_dir=d.train_dir, split=d.train_split, weight=1.0)]
    if d.text_file:
        sources.append(Source("text", "text", path=d.text_file, weight=d.text_weight))
    if d.get("llava_file", ""):
        sources.append(Source("llava", "llava", path=d.llava_file, data_dir=d.llava_images, weight=d.llava_weight))
    if d.get("grounded_instruct_dir", ""):
        sources.append(Source("grounded_instruct", "grit_instruct", data_dir=d.grounded_instruct_dir,
                              split=d.train_split, weight=d.grounded_instruct_weight))
    shards = data_shards(cfg)
    per_shard = cfg.train.batch_size // shards
    common = dict(process_count=shards, num_workers=d.num_workers)
    train = HostShards(lambda shard, state: Pipeline(
        sources, processor, example_config, per_shard, seed=cfg.seed, state=state, shuffle_buffer=d.shuffle_buffer,
        max_bad_fraction=d.max_bad_fraction, pack=d.get("pack", False), pack_max_images=d.get("pack_max_images", 4),
        process_index=shard, **common), shards, shard_states)

    def validation():
        """Collective: up to `data.val_batches` full batches, as many on every process."""
        from kosmos2_jax import multihost

        batches = []
        if d.val_dir and d.val_batches:
            val = HostShards(lambda shard, _: Pipeline(
                [Source("val", "grit", data_dir=d.val_dir, split=d.val_split)], processor, example_config,
                per_shard, seed=cfg.seed, repeat=False, shuffle_buffer=1, process_index=shard, **common), shards)
            for batch in val:
                if len(batch["input_ids"]) == val.batch_size:
                    batches.append(batch)
                if len(batches) == d.val_batches:
                    break
            val.close()
        return batches[:min(multihost.allgather_int(len(batches)))]
    return train, validation


def grounding_evaluator(cfg, model, processor):
    """A function params -> first-box accuracy on `data.grounding_items` items of the referring-
    expression dataset at `data.grounding_dir` (the shapes `refexp` config), or None when unset.
    Collective: each process generates for its share of the batches, on one device of its own
    with a copy of the params, and the records are combined (the same numbers on any process count)."""
    d = cfg.data
    if not d.get("grounding_dir", "") or not cfg.train.get("grounding_eval_every", 0):
        return None
    from kosmos2_jax import multihost
    from kosmos2_jax.evaluation.tasks import Context, ShapesTask

    task, batch = ShapesTask(), 32
    items = task.load(d.grounding_dir, d.grounding_split)[:d.grounding_items]
    mine = [items[i] for i in multihost.batch_share(len(items), batch)]

    def evaluate(params) -> float:
        ctx = Context(model, multihost.to_host_local(params), processor)
        records = [r for i in range(0, len(mine), batch) for r in task.predict(ctx, mine[i:i + batch])]
        return task.score(multihost.merge_shares(multihost.allgather_json(records), len(items), batch))["accuracy"]
    return evaluate


class Profile:
    """`train.profile_start` > 0: an XLA trace of steps [profile_start, profile_start + profile_steps)
    (0-based, so after the compiling first step) in WORKDIR/profile, for TensorBoard's profile plugin
    or Perfetto (WORKDIR/profile/process_I for each process of a multi-process run), and a table of
    where those steps spent their time (train/profiling.py), printed by the first process."""

    def __init__(self, first: int, steps: int, workdir: str, start: int, total: int):
        import jax

        self.first, self.dir, self.active = first, os.path.join(workdir, "profile"), False
        if jax.process_count() > 1:  # processes on one host would write the same file
            self.dir = os.path.join(self.dir, f"process_{jax.process_index()}")
        self.last = min(first + max(steps, 1), total) - 1
        if first and not start <= first < total:
            print(f"train.profile_start={first} is outside this run's steps [{start}, {total}): no profile",
                  flush=True)
            self.first = 0

    def before(self, step: int):
        if self.first and step == self.first:
            import jax

            jax.profiler.start_trace(self.dir)
            self.active = True

    def after(self, step: int, metrics, trainer, batch):
        if not self.active or step < self.last:
            return
        import jax

        from kosmos2_jax.train import profiling

        jax.block_until_ready(metrics)
        traced = step + 1 - self.first
        self.close()
        if jax.process_index() == 0:
            summary = profiling.summarize(self.dir, trainer.step_hlo(batch), traced)
            print(f"profile of steps {self.first}-{step} in {self.dir}:\n{profiling.format_summary(summary)}",
                  flush=True)

    def close(self):
        if self.active:
            import jax

            jax.profiler.stop_trace()
            self.active = False


def banner(trainer, start: int) -> str:
    import jax

    mesh = " ".join(f"{k}={v}" for k, v in trainer.mesh.shape.items())
    total, trainable = trainer.parameter_counts()
    return (f"{jax.device_count()} {jax.devices()[0].platform} devices on {jax.process_count()} process(es); "
            f"mesh {mesh}; {total:,} parameters ({trainable:,} trainable); "
            + (f"resumed from step {start}" if start else "fresh start"))


def restore_data_states(checkpoints, step: int, shards: int) -> list[dict]:
    """The checkpoint's per-shard pipeline positions, or a clear error when it was read as other shards."""
    import jax

    states = checkpoints.data_states(step)
    if len(states) != shards:
        raise ValueError(f"the checkpoint of step {step} was written reading the data as {len(states)} host "
                         f"shard(s) (one per process by default); this run has {jax.process_count()} "
                         f"process(es) reading {shards}: resume with a process count that divides {len(states)} "
                         f"and --config.data.shards={len(states)}")
    return states


def run(cfg, workdir: str) -> dict:
    import jax
    import numpy as np

    from kosmos2_jax import convert, multihost
    from kosmos2_jax.models import Kosmos2
    from kosmos2_jax.processor import Kosmos2Processor
    from kosmos2_jax.tokenizer import Kosmos2Tokenizer
    from kosmos2_jax.train.trainer import Checkpoints, Preemption, Trainer, abstract_like, format_eta, input_counts

    if cfg.distributed:
        multihost.initialize(cfg.get("coordinator_address", ""), cfg.get("num_processes", 0),
                             cfg.get("process_id", -1))
    primary = multihost.is_primary()
    tokenizer = Kosmos2Tokenizer.from_file(cfg.tokenizer, num_location_tokens=cfg.num_location_tokens)
    model, init_params = Kosmos2(model_config(cfg, tokenizer.vocab_size)), None
    if cfg.init.hf_dir and cfg.init.checkpoint:
        raise ValueError("set one of init.hf_dir and init.checkpoint, not both")
    shards = data_shards(cfg)
    checkpoints = Checkpoints(workdir, cfg.train.ckpt_every, cfg.train.keep, cfg.train.async_ckpt)
    start = checkpoints.latest_step() or 0
    shard_states = restore_data_states(checkpoints, start, shards) if start else None
    if cfg.init.hf_dir or cfg.init.checkpoint:  # the config's model, with these weights
        init_params = convert.load_params_for(model.config, cfg.init.hf_dir or cfg.init.checkpoint)
    processor = Kosmos2Processor(tokenizer, image_size=model.config.vision.image_size,
                                 num_image_tokens=model.config.latent_query_num)
    if primary:  # lab notes: what ran, and what `python -m kosmos2_jax.export` needs
        write_run_config(workdir, cfg, model.config)
    trainer = Trainer(model, cfg, tokenizer.first_location_id, tokenizer.num_location_tokens, init_params)
    if start:
        trainer.state = checkpoints.restore(start, abstract_like(trainer.state, trainer.state_shardings))
    if primary:
        print(banner(trainer, start), flush=True)
    train, validation = data_pipelines(cfg, processor, shard_states)
    val_batches = validation()
    grounding = grounding_evaluator(cfg, model, processor)
    writer = None
    if primary:
        from flax.metrics import tensorboard

        writer = tensorboard.SummaryWriter(os.path.join(workdir, "tb"))
    say = (lambda text: print(text, flush=True)) if primary else (lambda text: None)
    preemption = Preemption()
    total, log_every = cfg.train.steps, cfg.train.log_every
    history, last = [], {}
    t0, counts, steps_since = time.time(), np.zeros(4), 0  # counts: input_counts summed since the last log line
    run_start, stopped = time.time(), False
    profile = Profile(cfg.train.get("profile_start", 0), cfg.train.get("profile_steps", 3), workdir, start, total)
    try:
        for step in range(start, total):
            batch = next(train)
            profile.before(step)
            metrics = trainer.train_step(batch)
            profile.after(step, metrics, trainer, batch)
            steps_since += 1
            counts = counts + input_counts(batch, trainer.image_slots) * jax.process_count()
            done = step + 1
            if done % log_every == 0 or done == total:
                m = jax.device_get(metrics)
                loss = float(m["nll_sum"] / max(m["tokens"], 1))
                elapsed = time.time() - t0
                rate = steps_since / max(elapsed, 1e-9)
                last = {"step": done, "loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                        "tokens_per_s": counts[0] / max(elapsed, 1e-9), "step_time": elapsed / steps_since,
                        "loc_accuracy": float(m["loc_correct"] / max(m["loc_tokens"], 1)),
                        "token_fill": counts[0] / max(counts[1], 1), "image_fill": counts[2] / max(counts[3], 1)}
                history.append(last)
                say(f"step {done}/{total} loss {loss:.6f} loc_acc {last['loc_accuracy']:.3f} lr {last['lr']:.2e} "
                    f"gnorm {last['grad_norm']:.2f} {last['tokens_per_s']:.0f} tok/s "
                    f"fill: tokens {last['token_fill']:.2f} images {last['image_fill']:.2f} "
                    f"ETA {format_eta((total - done) / rate)}")
                if writer:
                    for k, v in last.items():
                        if k != "step":
                            writer.scalar(f"train/{k}", v, done)
                t0, counts, steps_since = time.time(), np.zeros(4), 0
            if cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == total) and val_batches:
                ev = trainer.evaluate(val_batches)
                say(f"step {done} validation loss {ev['loss']:.6f} loc_accuracy {ev['loc_accuracy']:.3f}")
                last.update({f"val_{k}": v for k, v in ev.items()})
                if writer:
                    for k, v in ev.items():
                        writer.scalar(f"val/{k}", v, done)
            every = cfg.train.get("grounding_eval_every", 0)
            if grounding and (done % every == 0 or done == total):
                accuracy = grounding(trainer.state["params"])
                say(f"step {done} grounding accuracy {accuracy:.3f} (first box, IoU >= 0.5, "
                    f"{cfg.data.grounding_items} held-out expressions)")
                last["val_grounding_accuracy"] = accuracy
                if writer:
                    writer.scalar("val/grounding_accuracy", accuracy, done)
            stop = preemption.stop(done)  # read once: SIGTERM may land between the save and the check
            saved = checkpoints.save(done, trainer.state, train.state, force=stop or done == total)
            if stop:
                stopped = True
                checkpoints.wait()  # "saved" only once the step is committed on disk
                if not (saved and checkpoints.committed(done)):
                    raise RuntimeError(f"SIGTERM: the checkpoint of step {done} was not saved")
                say(f"SIGTERM: saved step {done}, exiting")
                break
    finally:
        profile.close()
        checkpoints.wait()
        checkpoints.close()
        preemption.restore()
        train.close()
        if writer:
            writer.flush()
    if not stopped:  # every process writes its own shards of the params; none gathers the model
        convert.save_checkpoint(os.path.join(workdir, "export"), model.config, trainer.state["params"])
        say(f"exported params to {os.path.join(workdir, 'export')} ({time.time() - run_start:.0f}s)")
    return {"history": history, "last": last}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep Orbax/tfds INFO lines out of the console log
    try:
        if FLAGS.compile_only:
            if not FLAGS.topology:
                raise ValueError("--compile_only needs --topology (e.g. v5p-128 or v5p:4x4x8)")
            from kosmos2_jax.train.compile_check import check

            check(FLAGS.config, FLAGS.topology)
            return
        if not FLAGS.workdir:
            raise ValueError("--workdir is required (where checkpoints, logs and the export go)")
        run(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
