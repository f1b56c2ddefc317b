"""Train from an experiment config.

    python -m kosmos2_jax.train --config experiments/shapes_tiny.py --workdir workdir/shapes_tiny \\
        [--config.train.steps=300 --config.mesh.data=2 ...]

    python -m kosmos2_jax.train --config experiments/kosmos2_pretrain.py --compile_only --topology v5p-128

    python -m kosmos2_jax.train --config experiments/shapes_tiny.py --print_config   # every key

Resumes automatically from the latest checkpoint in the workdir (train state and data position),
after checking that the config builds the checkpoint's model (changed settings are listed); a
step that does not restore is named, and `--config.train.resume_step=N` resumes from an earlier
one. SIGTERM saves a checkpoint and exits; at the end the params are exported to WORKDIR/export
(a `convert.load_checkpoint` folder, replaced whole). TensorBoard logs go to WORKDIR/tb. Every
setting is range-checked before any work; an error is one line and exit code 2.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from kosmos2_jax import cli
from kosmos2_jax.train.trainer import model_config  # noqa: F401  (tests and benchmarks import it from here)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, logs and the export go")
flags.DEFINE_bool("compile_only", False, "compile the train step for --topology and report memory and sharding; "
                  "trains nothing (train/compile_check.py)")
flags.DEFINE_string("topology", "", "with --compile_only: a TPU slice, e.g. v5p-128 or v5p:4x4x8 (needs libtpu)")
flags.DEFINE_bool("print_config", False, "print the config (every key --config.KEY=VALUE can set) and exit")
flags.DEFINE_string("compilation_cache", cli.default_compilation_cache(),
                    "persistent XLA compilation cache: a rerun or resume of the same config loads its programs "
                    "instead of compiling them (env KOSMOS2_COMPILATION_CACHE)")
flags.DEFINE_bool("no_compilation_cache", False, "compile afresh and write no cache")
flags.mark_flags_as_required(["config"])


def write_run_config(workdir: str, cfg, model_config) -> None:
    from kosmos2_jax import outputs

    with outputs.atomic_file(os.path.join(workdir, "config.json")) as f:
        f.write(cfg.to_json_best_effort(indent=2))
    outputs.write_json(os.path.join(workdir, "model_config.json"), model_config.to_dict(), indent=2)


def check_resume(workdir: str, cfg, model_config, say=print) -> None:
    """Before a resumed run writes anything: the model it would build must be the checkpoint's
    (else a one-line error naming the differing fields); changed settings are listed."""
    import json

    from kosmos2_jax import convert
    from kosmos2_jax.cli import UsageError
    from kosmos2_jax.models import Kosmos2Config
    from kosmos2_jax.train import config_check

    saved_model = os.path.join(workdir, "model_config.json")
    if os.path.isfile(saved_model):
        saved = Kosmos2Config.from_dict(convert.read_json(saved_model, "the run's model config"))
        diffs = convert.architecture_differences(saved, model_config)
        if diffs:
            raise UsageError(f"--workdir {workdir!r} holds checkpoints of another model (checkpoint vs this config): "
                             f"{'; '.join(diffs)}; use another --workdir, or the run's own settings")
    saved_cfg = os.path.join(workdir, "config.json")
    if os.path.isfile(saved_cfg):
        changed = config_check.changes(convert.read_json(saved_cfg, "the run config"), json.loads(cfg.to_json_best_effort()))
        layout = [c for c in changed if c.split(":")[0] in config_check.STATE_LAYOUT_KEYS]
        if layout:
            raise UsageError(f"--workdir {workdir!r}: these settings shape the saved train state and cannot change "
                             f"on resume: {'; '.join(layout)}")
        if changed:
            say("resuming with changed settings: " + "; ".join(changed))


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
    """A function params -> first-box accuracy (percent) on `data.grounding_items` items of the referring-
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


def plan(cfg, start: int) -> str:
    """What the run will do: steps, batch, and how many passes over the training records that is."""
    from kosmos2_jax.data.pipeline import split_size

    t, d = cfg.train, cfg.data
    records = split_size(d.train_dir, d.train_split)
    data = (f"{records:,} training records ({d.train_split} of {d.train_dir}), "
            f"{t.steps * t.batch_size / records:.1f} epochs" if records else f"training data {d.train_dir}")
    return (f"plan: steps {start + 1}-{t.steps} of {t.batch_size} rows x {d.seq_len} tokens; {data}; "
            f"validation every {t.eval_every or '-'} steps, grounding every {t.get('grounding_eval_every', 0) or '-'}")


TIMED_STEPS = 10  # steps after the compiling first one that the time estimate is measured over


def expected_time(remaining: int, step_s: float) -> str:
    from kosmos2_jax.train.trainer import format_eta

    return (f"expected: {step_s:.3f} s/step here (timed over {TIMED_STEPS} steps), about {format_eta(remaining * step_s)} "
            f"for the remaining {remaining} steps, plus evaluations and the export")


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


def resume_step(checkpoints, wanted: int, workdir: str) -> tuple[int, list[int]]:
    """(the step to resume from, the later steps to move aside once it has restored): the latest
    checkpoint, or `train.resume_step` when set. Resuming from an earlier step (the latest is
    damaged, say) moves the later ones to WORKDIR/damaged_checkpoints/, so the run can write those
    steps again; never automatic, as a checkpoint that does not restore may just as well be one the
    config no longer matches."""
    from kosmos2_jax.cli import UsageError

    steps = sorted(checkpoints.manager.all_steps())
    if not wanted:
        return (steps[-1] if steps else 0), []
    if wanted not in steps:
        raise UsageError(f"config.train.resume_step={wanted}: {workdir!r} has no checkpoint of that step "
                         f"(it has {steps or 'none'})")
    return wanted, [s for s in steps if s > wanted]


def run(cfg, workdir: str) -> dict:
    import jax
    import numpy as np

    from kosmos2_jax import convert, multihost
    from kosmos2_jax.models import Kosmos2
    from kosmos2_jax.processor import Kosmos2Processor
    from kosmos2_jax.tokenizer import Kosmos2Tokenizer
    from kosmos2_jax.cli import UsageError
    from kosmos2_jax.train import config_check
    from kosmos2_jax.train.trainer import Checkpoints, Preemption, Trainer, abstract_like, format_eta, input_counts

    config_check.check(cfg)

    if cfg.distributed:
        multihost.initialize(cfg.get("coordinator_address", ""), cfg.get("num_processes", 0),
                             cfg.get("process_id", -1))
    primary = multihost.is_primary()
    say = (lambda text: print(text, flush=True)) if primary else (lambda text: None)
    tokenizer = Kosmos2Tokenizer.from_file(cfg.tokenizer, num_location_tokens=cfg.num_location_tokens)
    model, init_params = Kosmos2(model_config(cfg, tokenizer.vocab_size)), None
    if cfg.init.hf_dir and cfg.init.checkpoint:
        raise ValueError("set one of init.hf_dir and init.checkpoint, not both")
    shards = data_shards(cfg)
    checkpoints = Checkpoints(workdir, cfg.train.ckpt_every, cfg.train.keep, cfg.train.async_ckpt)
    try:  # nothing is written before the checkpoint is known to restore into this config
        start, later = resume_step(checkpoints, cfg.train.get("resume_step", 0), workdir)
        shard_states = None
        if start:
            check_resume(workdir, cfg, model.config, say)
            if start > cfg.train.steps:
                raise UsageError(f"config.train.steps={cfg.train.steps} but {workdir!r} is at step {start}: "
                                 f"give more steps, or another --workdir")
            shard_states = restore_data_states(checkpoints, start, shards)
        if cfg.init.hf_dir or cfg.init.checkpoint:  # the config's model, with these weights
            init_params = convert.load_params_for(model.config, cfg.init.hf_dir or cfg.init.checkpoint)
        processor = Kosmos2Processor(tokenizer, image_size=model.config.vision.image_size,
                                     num_image_tokens=model.config.latent_query_num)
        trainer = Trainer(model, cfg, tokenizer.first_location_id, tokenizer.num_location_tokens, init_params)
        if start:
            trainer.state = checkpoints.restore(start, abstract_like(trainer.state, trainer.state_shardings))
        for step in later:
            say(f"resume_step {start}: moved the checkpoint of step {step} to {checkpoints.set_aside(step)}")
    except BaseException:
        checkpoints.close()
        raise
    if primary:  # lab notes: what ran, and what `python -m kosmos2_jax.export` needs
        write_run_config(workdir, cfg, model.config)
    say(banner(trainer, start))
    say(plan(cfg, start))
    train, validation = data_pipelines(cfg, processor, shard_states)
    val_batches = validation()
    grounding = grounding_evaluator(cfg, model, processor)
    writer = None
    if primary:
        from flax.metrics import tensorboard

        writer = tensorboard.SummaryWriter(os.path.join(workdir, "tb"))
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
            if step == start:  # compiled: time the next TIMED_STEPS
                jax.block_until_ready(metrics)
                timed_from = time.time()
            elif step == start + TIMED_STEPS:
                jax.block_until_ready(metrics)
                say(expected_time(total - step - 1, (time.time() - timed_from) / TIMED_STEPS))
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
                say(f"step {done} grounding accuracy {accuracy:.1f}% (first box, IoU >= 0.5, "
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
    from kosmos2_jax.cli import USER_ERRORS

    cli.use_compilation_cache(None if FLAGS.no_compilation_cache else FLAGS.compilation_cache)
    try:
        if FLAGS.print_config:
            print(FLAGS.config)
            return
        if FLAGS.compile_only:
            if not FLAGS.topology:
                raise ValueError("--compile_only needs --topology (e.g. v5p-128 or v5p:4x4x8)")
            from kosmos2_jax.train import config_check
            from kosmos2_jax.train.compile_check import check

            config_check.check(FLAGS.config, need_tokenizer=False)
            check(FLAGS.config, FLAGS.topology)
            return
        if not FLAGS.workdir:
            raise ValueError("--workdir is required (where checkpoints, logs and the export go)")
        run(FLAGS.config, FLAGS.workdir)
    except USER_ERRORS as e:
        if os.environ.get("KOSMOS2_DEBUG"):
            raise
        from kosmos2_jax.cli import stderr

        print(f"error: {e}", file=stderr(), flush=True)
        sys.stdout.flush()
        # Not sys.exit: after a failed Orbax restore, its event-loop threads print tracebacks at
        # interpreter shutdown.
        os._exit(2)


def parse_flags(argv):
    """absl's flag parsing, with a bad `--config.KEY=VALUE` (an unknown key, a value of the wrong
    type) as one line instead of a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e.args[0] if e.args else e)
        if message.startswith(("'", '"')):  # ml_collections wraps a KeyError's repr
            message = message.strip("'\"").replace("\\'", "'").replace("\\n", " ")
            key = message.split("'")[1] if message.count("'") >= 2 else ""
            bad = [a for a in argv if key and a.startswith("--config.") and key in a.split("=")[0]]
            message = f"{bad[0].split('=')[0]}: no such key ({message})" if bad else message
    print(f"error: bad flag: {' '.join(message.split())} (list the config's keys with --config FILE --print_config)",
          file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
