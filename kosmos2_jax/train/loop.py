"""One training run, top to bottom: the loss, the train and eval steps, and `run(cfg, workdir)`.

Fork this file to change the loss, the update or what a run does: copy it into your own package
and run the copy as `python -m yourpkg.train --config ... --workdir ...` (the same flags as
`python -m kosmos2_jax.train`; see the end of the file). Sections, in order: the step (`loss_fn`,
`train_step`, `eval_step`: pure functions, jitted by `Trainer` over the mesh), setup (processes,
tokenizer, model), state and restore (a fresh or resumed train state, checked against the workdir
before anything is written), data, evaluations (`config.evals`), logging, and the run (train
step, logging, validation, evaluations, checkpoints, SIGTERM, export).

A metric `loss_fn` returns beside the built-in ones is logged: a name ending in `_sum` (summed over
targets, like `nll_sum`) as its mean per target, under the name without `_sum`; any other scalar as
it is. The library pieces: `trainer.Trainer` (sharded state, batches on the devices),
`checkpoints` (Orbax manager, preemption), `data.pipeline`, `evaluation.tasks`.
"""

from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kosmos2_jax import weights
from kosmos2_jax.utils import multihost
from kosmos2_jax.train import config_check, lora
from kosmos2_jax.train.checkpoints import Checkpoints, Preemption
from kosmos2_jax.train.metrics_log import MetricsLog
from kosmos2_jax.format.images import normalize_pixels
from kosmos2_jax.train.loss import chunked_lm_head_loss, cross_entropy
from kosmos2_jax.train.optim import lr_multipliers
from kosmos2_jax.train.trainer import (StepContext, Trainer, accumulate_gradients, format_eta,
                                       apply_trained, grad_of_trained, input_counts, model_config, model_init, source_examples)
from kosmos2_jax.utils.errors import UsageError

TIMED_STEPS = 10  # steps that compile nothing, which the time estimate is measured over


# --- the step -------------------------------------------------------------------------------------
def loss_fn(params, batch, rng, ctx: StepContext, deterministic: bool = False):
    """-> (the loss to differentiate, metrics). The loss is next-token cross-entropy summed over the
    `loss_mask[:, 1:]` targets, location-token targets weighted by `train.location_loss_weight` and
    soft when `train.location_sigma` > 0; the step divides its gradient by the target count. The
    metrics are sums (`nll_sum`, unweighted; `tokens`; location-token accuracy counts; with the
    batch's `source_ids`, per-source `source_nll_sum` and `source_tokens` [num_sources + 1], index
    0 padding). uint8 `pixel_values` (the input pipeline's) are CLIP-normalized here, on the device."""
    pixels = batch["pixel_values"]
    if pixels.dtype == jnp.uint8:
        pixels = normalize_pixels(pixels, jnp)
    hidden = ctx.model.apply({"params": params}, pixels, batch["input_ids"], batch["attention_mask"],
                             batch["image_embeds_position_mask"], deterministic=deterministic, rngs={"dropout": rng},
                             segment_ids=batch.get("segment_ids"), image_index=batch.get("image_index"),
                             return_hidden=True)[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    first, n_loc = ctx.first_location_id, ctx.num_location_tokens
    is_loc = ((targets >= first) & (targets < first + n_loc)).astype(jnp.float32)
    weights = mask * (1.0 + (ctx.location_weight - 1.0) * is_loc)
    embedding = nn.unbox(params["text_model"]["embed_tokens"]["embedding"])  # the tied LM head
    with jax.named_scope("lm_head"):  # named for the profile summary (train/profiling.py)
        if ctx.loss_impl == "chunked":
            loss, nll, correct = chunked_lm_head_loss(hidden, embedding, targets, weights, mask > 0, ctx.loss_chunk,
                                                      location_kernel=ctx.location_kernel, first_location_id=first)
        else:
            logits = jnp.einsum("btd,vd->btv", hidden, embedding.astype(hidden.dtype),
                                preferred_element_type=jnp.float32)
            loss, nll, correct = cross_entropy(logits, targets, weights, ctx.location_kernel, first)
    metrics = {"nll_sum": jnp.sum(nll * mask), "tokens": jnp.sum(mask),
               "loc_correct": jnp.sum(correct * is_loc * mask), "loc_tokens": jnp.sum(is_loc * mask)}
    if ctx.num_sources and "source_ids" in batch:
        by_source = jax.nn.one_hot(batch["source_ids"][:, 1:], ctx.num_sources + 1, dtype=jnp.float32)
        metrics["source_nll_sum"] = jnp.einsum("bt,bts->s", nll * mask, by_source)
        metrics["source_tokens"] = jnp.einsum("bt,bts->s", mask, by_source)
    return loss, metrics


def train_step(ctx: StepContext, state: dict, batch: dict):
    """One optimizer step: state {step, params, opt_state} -> (the next state, metrics). The
    gradient is the mean over the batch's targets (summed over `train.grad_accum_steps`
    micro-batches first); frozen parameters (`train.freeze`) get none. Dropout keys are
    fold_in(seed, step), so a resumed run repeats the uninterrupted one."""
    rng = jax.random.fold_in(jax.random.PRNGKey(ctx.seed), state["step"])
    grad_fn = grad_of_trained(lambda p, b, r: loss_fn(p, b, r, ctx), ctx.mask)
    if ctx.grad_accum_steps == 1:
        grads, metrics = grad_fn(state["params"], batch, rng)
    else:
        grads, metrics = accumulate_gradients(grad_fn, state["params"], batch, rng, ctx.grad_accum_steps,
                                              ctx.batch_shards)
    with jax.named_scope("optimizer"):
        tokens = jnp.maximum(metrics["tokens"], 1.0)
        grads = jax.tree_util.tree_map(lambda g, m: g * m.astype(g.dtype) / tokens, grads, ctx.mask)
        updates, opt_state = ctx.tx.update(grads, state["opt_state"], state["params"])
        params = apply_trained(state["params"], updates, ctx.mask)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=ctx.schedule(state["step"]))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def eval_step(ctx: StepContext, params, batch: dict) -> dict:
    """The metrics of `loss_fn` without dropout (validation)."""
    return loss_fn(params, batch, jax.random.PRNGKey(0), ctx, deterministic=True)[1]


# --- state and restore ----------------------------------------------------------------------------
def write_run_config(workdir: str, cfg, model_cfg) -> None:
    """Lab notes: what ran, and the model `python -m kosmos2_jax.export` rebuilds."""
    from kosmos2_jax.utils import outputs

    with outputs.atomic_file(os.path.join(workdir, "config.json")) as f:
        f.write(cfg.to_json_best_effort(indent=2))
    outputs.write_json(os.path.join(workdir, "model_config.json"), model_cfg.to_dict(), indent=2)


def check_resume(workdir: str, cfg, model_cfg, say=print) -> None:
    """Before a resumed run writes anything: the model it would build must be the checkpoint's
    (else a one-line error naming the differing fields); changed settings are listed."""
    from kosmos2_jax.models import Kosmos2Config

    saved_model = os.path.join(workdir, "model_config.json")
    if os.path.isfile(saved_model):
        saved = Kosmos2Config.from_dict(weights.read_json(saved_model, "the run's model config"))
        diffs = weights.architecture_differences(saved, model_cfg)
        if diffs:
            raise UsageError(f"--workdir {workdir!r} holds checkpoints of another model (checkpoint vs this config): "
                             f"{'; '.join(diffs)}; use another --workdir, or the run's own settings")
    saved_cfg = os.path.join(workdir, "config.json")
    if os.path.isfile(saved_cfg):
        changed = config_check.changes(weights.read_json(saved_cfg, "the run config"), json.loads(cfg.to_json_best_effort()))
        layout = [c for c in changed if c.split(":")[0] in config_check.STATE_LAYOUT_KEYS]
        if layout:
            raise UsageError(f"--workdir {workdir!r}: these settings shape the saved train state and cannot change "
                             f"on resume: {'; '.join(layout)}")
        if changed:
            say("resuming with changed settings: " + "; ".join(changed))


def resume_step(checkpoints: Checkpoints, wanted: int, workdir: str) -> tuple[int, list[int]]:
    """(the step to resume from, the later steps to move aside once it has restored): the latest
    checkpoint, or `train.resume_step` when set. Resuming from an earlier step (the latest is
    damaged, say) moves the later ones to WORKDIR/damaged_checkpoints/, so the run can write those
    steps again; never automatic, as a checkpoint that does not restore may just as well be one the
    config no longer matches."""
    steps = sorted(checkpoints.manager.all_steps())
    if not wanted:
        return (steps[-1] if steps else 0), []
    if wanted not in steps:
        raise UsageError(f"config.train.resume_step={wanted}: {workdir!r} has no checkpoint of that step "
                         f"(it has {steps or 'none'})")
    return wanted, [s for s in steps if s > wanted]


def restore_data_states(checkpoints: Checkpoints, step: int, shards: int) -> list[dict]:
    """The checkpoint's per-shard pipeline positions, or a clear error when it was read as other shards."""
    states = checkpoints.data_states(step)
    if len(states) != shards:
        raise UsageError(f"the checkpoint of step {step} was written reading the data as {len(states)} host "
                         f"shard(s) (one per process by default); this run has {jax.process_count()} "
                         f"process(es) reading {shards}: resume with a process count that divides {len(states)} "
                         f"and --config.data.shards={len(states)}")
    return states


def build_state(cfg, workdir: str, model, tokenizer, shards: int, say):
    """(trainer, checkpoints, first step, the data shards' saved states or None). A resume is checked
    (model, state layout, step count, data shards) and restored before anything is written."""
    if cfg.init.hf_dir and cfg.init.checkpoint:
        raise UsageError("set one of init.hf_dir and init.checkpoint, not both")
    if cfg.optim.lr_multipliers:  # a pattern matching no parameter: refused before anything is written
        lr_multipliers(nn.unbox(jax.eval_shape(model_init(model), jax.random.PRNGKey(0))), cfg.optim.lr_multipliers)
    if lora.enabled(cfg.train.lora):  # targets that match no layer: refused before anything is written
        adapted = lora.apply(model, cfg.train.lora)
        lora.require_adapters(nn.unbox(jax.eval_shape(model_init(adapted), jax.random.PRNGKey(0))), cfg.train.lora)
    checkpoints = Checkpoints(workdir, cfg.train.ckpt_every, cfg.train.keep, cfg.train.async_ckpt)
    try:
        start, later = resume_step(checkpoints, cfg.train.resume_step, workdir)
        shard_states = None
        if start:
            check_resume(workdir, cfg, model.config, say)
            if start > cfg.train.steps:
                raise UsageError(f"config.train.steps={cfg.train.steps} but {workdir!r} is at step {start}: "
                                 f"give more steps, or another --workdir")
            shard_states = restore_data_states(checkpoints, start, shards)
        init_params = None
        if cfg.init.hf_dir or cfg.init.checkpoint:  # the config's model, with these weights
            init_params = weights.load_params_for(model.config, cfg.init.hf_dir or cfg.init.checkpoint)
        trainer = Trainer(model, cfg, tokenizer.first_location_id, tokenizer.num_location_tokens, init_params,
                          sources=tuple(s.name for s in mixture(cfg)), train_step=train_step, eval_step=eval_step)
        if start:
            trainer.restore(checkpoints, start)
        for step in later:
            say(f"resume_step {start}: moved the checkpoint of step {step} to {checkpoints.set_aside(step)}")
    except BaseException:
        checkpoints.close()
        raise
    return trainer, checkpoints, start, shard_states


# --- data -----------------------------------------------------------------------------------------
def data_shards(cfg) -> int:
    """How many host shards the data is read as (`data.shards`, default: one per process). Each
    process reads `shards / processes` of them and concatenates their batches, so one machine can
    replay a pod's exact data order, and a checkpoint resumes on any process count dividing it."""
    shards = cfg.data.shards or jax.process_count()
    if shards % jax.process_count():
        raise UsageError(f"data.shards={shards} is not a multiple of the {jax.process_count()} processes")
    if cfg.train.batch_size % shards:
        raise UsageError(f"train.batch_size={cfg.train.batch_size} is not divisible by {shards} data shards "
                         f"(data.shards, default: one per process)")
    return shards


def mixture(cfg):
    """The training sources of `config.data.sources` that have their folder or file set (weights
    relative; `config_check` has checked kinds, weights and paths)."""
    from kosmos2_jax.data.pipeline import Source

    entries = cfg.data.sources
    return [Source(name, e.kind, data_dir=e.data_dir, split=e.split, weight=e.weight, path=e.path)
            for name, e in sorted(entries.items()) if e.data_dir or e.path]


def data_pipelines(cfg, processor, shard_states=None):
    """(the training batches of this process's data shards, a function -> its validation batches)."""
    from kosmos2_jax.data.examples import ExampleConfig
    from kosmos2_jax.data.pipeline import HostShards, Pipeline, Source

    d = cfg.data
    example_config = ExampleConfig(seq_len=d.seq_len, preprocess=d.preprocess, span_mode=d.span_mode,
                                   score_threshold=d.score_threshold, grounded_prob=d.grounded_prob,
                                   box_formula=d.box_formula)
    shards = data_shards(cfg)
    per_shard = cfg.train.batch_size // shards
    common = dict(process_count=shards, num_workers=d.num_workers)
    sources = mixture(cfg)
    train = HostShards(lambda shard, state: Pipeline(
        sources, processor, example_config, per_shard, seed=cfg.seed, state=state, shuffle_buffer=d.shuffle_buffer,
        max_bad_fraction=d.max_bad_fraction, pack=d.pack, pack_max_images=d.pack_max_images,
        process_index=shard, **common), shards, shard_states)

    def validation():
        """Collective: up to `data.val_batches` full batches, as many on every process."""
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


# --- evaluations ----------------------------------------------------------------------------------
class Evaluation:
    """One entry of `config.evals`: an `evaluate` task on the first `max_items` items of a split,
    run on the training params. Collective: each process generates for its share of the batches,
    on one device of its own with a copy of the params, and the records are combined, so the
    metrics are the same on any process count (and equal `python -m kosmos2_jax.evaluate`'s)."""

    def __init__(self, name: str, spec, model, processor):
        from kosmos2_jax.evaluation.tasks import TASKS

        self.name, self.spec, self.model, self.processor = name, spec, model, processor
        self.task = TASKS[spec.task]
        items = self.task.load(spec.data_dir, spec.split)[:spec.max_items]
        if not items:
            raise UsageError(f"config.evals.{name}: no {spec.task} items in split {spec.split!r} of {spec.data_dir}")
        self.count, self.image_dir = len(items), spec.image_dir or os.path.join(spec.data_dir, "images")
        self.mine = [items[i] for i in multihost.batch_share(len(items), spec.batch_size)]

    def due(self, step: int, total: int) -> bool:
        return step % self.spec.every == 0 or step == total

    def __call__(self, params) -> dict:
        from kosmos2_jax.evaluation.tasks import Context

        b = self.spec.batch_size
        ctx = Context(self.model, multihost.to_host_local(params), self.processor, image_dir=self.image_dir,
                      batch_size=b)
        records = [r for i in range(0, len(self.mine), b) for r in self.task.predict(ctx, self.mine[i:i + b])]
        return self.task.score(multihost.merge_shares(multihost.allgather_json(records), self.count, b))

    def describe(self, metrics: dict) -> str:
        values = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
        return f"eval {self.name}: {values} ({self.spec.task} {self.spec.split}, {self.count} items)"


def evaluations(cfg, model, processor) -> list[Evaluation]:
    """The scheduled entries of `config.evals` (`every` > 0 and a `data_dir`)."""
    evals = cfg.evals
    return [Evaluation(name, evals[name], model, processor) for name in sorted(evals)
            if evals[name].every and evals[name].data_dir]


# --- logging --------------------------------------------------------------------------------------
def banner(trainer: Trainer, start: int) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in trainer.mesh.shape.items())
    total, trainable = trainer.parameter_counts()
    return (f"{jax.device_count()} {jax.devices()[0].platform} devices on {jax.process_count()} process(es); "
            f"mesh {mesh}; {total:,} parameters ({trainable:,} trainable"
            + (f", {lora.count_adapters(trainer.state['params']):,} in LoRA adapters" if trainer.lora else "")
            + f"; optimizer state {trainer.optimizer_state_bytes() / 2**20:,.1f} MiB); "
            + (f"resumed from step {start}" if start else "fresh start"))


def plan(cfg, start: int, evals: list[Evaluation]) -> str:
    """What the run will do: steps, batch, how many passes over the training records, evaluations."""
    from kosmos2_jax.data.pipeline import split_size

    t, d = cfg.train, cfg.data
    sources = mixture(cfg)
    total = sum(s.weight for s in sources)
    parts = []
    for s in sources:
        records = split_size(s.data_dir, s.split) if s.data_dir and not s.path else None
        where = f"{s.split} of {s.data_dir}" if s.data_dir and not s.path else s.path
        if len(sources) == 1:
            if records:  # counted in rows, not examples: a packed row holds several
                packed = " at one example a row (packed: more)" if d.pack else ""
                parts.append(f"{records:,} training records ({where}), "
                             f"{t.steps * t.batch_size / records:.1f} epochs{packed}")
            else:
                parts.append(f"training data {where}")
        else:
            parts.append(f"{s.name} {100 * s.weight / total:.0f}%: " + (f"{records:,} records ({where})" if records else where))
    data = "; ".join(parts)
    scheduled = "".join(f", {e.name} ({e.spec.task}) every {e.spec.every}" for e in evals)
    return (f"plan: steps {start + 1}-{t.steps} of {t.batch_size} rows x {d.seq_len} tokens; {data}; "
            f"validation every {t.eval_every or '-'} steps{scheduled}")


class StepTimer:
    """The startup line's time estimate: the mean wall time of the first TIMED_STEPS steps that
    compiled nothing, each from reading its batch to its result (evaluations and checkpoints
    between steps left out). A batch with another count of real images runs another step program
    (train/image_slots.py: up to four), whose first step compiles it."""

    def __init__(self, steps: int = TIMED_STEPS, clock=time.perf_counter):
        self.wanted, self.clock, self.seconds, self.steps, self.started = steps, clock, 0.0, 0, 0.0

    def before(self):
        """Call before a step reads its batch."""
        if self.steps < self.wanted:
            self.started = self.clock()

    def after(self, metrics, compiled: bool) -> float | None:
        """Call after each step: the seconds per step once `wanted` steps are timed (once), else None."""
        if self.steps >= self.wanted:
            return None
        jax.block_until_ready(metrics)  # the step's time, and no earlier step still running at `before`
        if not compiled:
            self.steps += 1
            self.seconds += self.clock() - self.started
        return self.seconds / self.steps if self.steps == self.wanted else None


def expected_time(remaining: int, step_s: float) -> str:
    return (f"expected: {step_s:.3f} s/step here (timed over {TIMED_STEPS} steps), about {format_eta(remaining * step_s)} "
            f"for the remaining {remaining} steps, plus evaluations and the export")


class Profile:
    """`train.profile_start` > 0: an XLA trace of steps [profile_start, profile_start + profile_steps)
    (0-based, so after the compiling first step) in WORKDIR/profile, for TensorBoard's profile plugin
    or Perfetto (WORKDIR/profile/process_I for each process of a multi-process run), and a table of
    where those steps spent their time (train/profiling.py), printed by the first process."""

    def __init__(self, first: int, steps: int, workdir: str, start: int, total: int):
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
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after(self, step: int, metrics, trainer, batch):
        if not self.active or step < self.last:
            return
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
            jax.profiler.stop_trace()
            self.active = False


BUILTIN_METRICS = ("nll_sum", "tokens", "loc_correct", "loc_tokens", "source_nll_sum", "source_tokens", "grad_norm",
                   "lr")


def extra_metrics(metrics: dict) -> dict:
    """The scalar metrics a (forked) `loss_fn` adds: `NAME_sum` -> NAME, its mean per target; any
    other as it is."""
    tokens = max(float(metrics["tokens"]), 1.0)
    out = {}
    for k, v in sorted(metrics.items()):
        if k in BUILTIN_METRICS or np.ndim(v):
            continue
        out[k[:-4] if k.endswith("_sum") else k] = float(v) / tokens if k.endswith("_sum") else float(v)
    return out


class Log:
    """The console line every `train.log_every` steps, the TensorBoard scalars and WORKDIR/metrics.jsonl
    (process 0; `train/metrics_log.py`)."""

    def __init__(self, workdir: str, primary: bool, start: int = 0):
        self.say = (lambda text: print(text, flush=True)) if primary else (lambda text: None)
        self.writer = self.metrics = None
        if primary:
            from flax.metrics import tensorboard

            self.writer = tensorboard.SummaryWriter(os.path.join(workdir, "tb"))
            self.metrics = MetricsLog(workdir, start)
        self.history, self.last, self.sources = [], {}, ()
        self.step_s = None  # a step's time without compiling (StepTimer's), once measured
        self._reset()

    def _reset(self):
        self.t0, self.counts, self.steps = time.time(), np.zeros(4), 0  # counts: input_counts since the last line
        self.compiled = False  # a step since the last line compiled its program
        self.examples = None  # examples per source since the last line

    def scalars(self, prefix: str, values: dict, step: int):
        if self.writer:
            for k, v in values.items():
                if k != "step":
                    self.writer.scalar(f"{prefix}/{k}", v, step)
            self.metrics.write(prefix, values, step)

    def step(self, batch, trainer: Trainer):
        self.steps += 1
        self.compiled = self.compiled or trainer.compiled_last_step
        self.counts = self.counts + input_counts(batch, trainer.image_slots) * jax.process_count()
        if trainer.sources and "source_ids" in batch:
            self.sources = trainer.sources
            counts = source_examples(batch, len(trainer.sources))  # this process's; summed in `_source_line`
            self.examples = counts if self.examples is None else self.examples + counts

    def line(self, done: int, total: int, metrics):
        m = jax.device_get(metrics)
        loss = float(m["nll_sum"] / max(m["tokens"], 1))
        elapsed = max(time.time() - self.t0, 1e-9)
        c = self.counts
        self.last = {"step": done, "loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                     "tokens_per_s": c[0] / elapsed, "step_time": elapsed / self.steps,
                     "loc_accuracy": float(m["loc_correct"] / max(m["loc_tokens"], 1)),
                     "token_fill": c[0] / max(c[1], 1), "image_fill": c[2] / max(c[3], 1)}
        extra = extra_metrics(m)
        self.last.update(extra)
        self.history.append(self.last)
        last = self.last
        # a compile is paid once: the ETA of a line after one extrapolates the measured step time
        step_s = self.step_s if self.compiled and self.step_s else elapsed / self.steps
        extra_text = "".join(f" {k} {v:.6f}" for k, v in extra.items())
        self.say(f"step {done}/{total} loss {loss:.6f}{extra_text} loc_acc {last['loc_accuracy']:.3f} "
                 f"lr {last['lr']:.2e} gnorm {last['grad_norm']:.2f} {last['tokens_per_s']:.0f} tok/s "
                 f"fill: tokens {last['token_fill']:.2f} images {last['image_fill']:.2f} "
                 f"ETA {format_eta((total - done) * step_s)}")
        self.scalars("train", last, done)
        if "source_tokens" in m and self.examples is not None:
            self._source_line(done, m)
        self._reset()

    def _source_line(self, done: int, m):
        """Each source's loss (the logged step's targets from it), examples since the last line (all
        processes') and target tokens of the logged step; printed for a mixture, in TensorBoard for
        any. Collective: every process logs the same steps."""
        self.examples = np.sum(multihost.allgather_json(self.examples.tolist()), axis=0)
        parts, share = [], self.examples[1:] / max(self.examples[1:].sum(), 1)
        for i, name in enumerate(self.sources, start=1):
            tokens = float(m["source_tokens"][i])
            values = {"examples": float(self.examples[i]), "tokens": tokens}
            if tokens:
                values["loss"] = float(m["source_nll_sum"][i]) / tokens
            self.scalars(f"train/source/{name}", values, done)
            self.last.update({f"source_{name}_{k}": v for k, v in values.items()})
            loss = f"loss {values['loss']:.4f}" if tokens else "no targets"
            parts.append(f"{name} {loss}, {int(self.examples[i])} examples ({share[i - 1]:.0%})")
        if len(self.sources) > 1:
            self.say(f"  sources: {'; '.join(parts)}")

    def close(self):
        if self.writer:
            self.writer.flush()


# --- the run --------------------------------------------------------------------------------------
def run(cfg, workdir: str) -> dict:
    """Train `cfg` in `workdir` (resuming from its latest checkpoint) and export the params to
    WORKDIR/export -> {"history": the logged lines, "last": the last one with its evaluations}."""
    from kosmos2_jax.models import Kosmos2
    from kosmos2_jax.format.processor import Kosmos2Processor
    from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer

    # setup
    config_check.check(cfg)
    if cfg.distributed:
        multihost.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    primary = multihost.is_primary()
    say = (lambda text: print(text, flush=True)) if primary else (lambda text: None)
    tokenizer = Kosmos2Tokenizer.from_file(cfg.tokenizer, num_location_tokens=cfg.num_location_tokens)
    model = Kosmos2(model_config(cfg, tokenizer.vocab_size))
    processor = Kosmos2Processor(tokenizer, image_size=model.config.vision.image_size,
                                 num_image_tokens=model.config.latent_query_num)
    shards = data_shards(cfg)

    # state and restore: nothing is written before the checkpoint is known to restore into this config
    trainer, checkpoints, start, shard_states = build_state(cfg, workdir, model, tokenizer, shards, say)
    if primary:
        write_run_config(workdir, cfg, model.config)

    # data and evaluations
    try:
        evals = evaluations(cfg, model, processor)  # they read trainer.plain_params()
    except BaseException:
        checkpoints.close()
        raise
    say(banner(trainer, start))
    export_dir = os.path.join(workdir, "export")
    if start >= cfg.train.steps:  # a rerun of a finished run changes nothing
        checkpoints.close()
        exported = weights.exported_step(export_dir) == start
        say(f"nothing to train: {workdir} holds step {start} of train.steps={cfg.train.steps}"
            + (f" and {export_dir} holds its params" if exported else "")
            + " (raise --config.train.steps to train further)")
        if not exported:
            export(export_dir, model, trainer, start, say)
        return {"history": [], "last": {}}
    say(plan(cfg, start, evals))
    train, validation = data_pipelines(cfg, processor, shard_states)
    val_batches = validation()

    # the loop
    log, preemption = Log(workdir, primary, start), Preemption()
    total, stopped = cfg.train.steps, False
    timer = StepTimer()
    profile = Profile(cfg.train.profile_start, cfg.train.profile_steps, workdir, start, total)
    try:
        for step in range(start, total):
            timer.before()
            batch = next(train)
            profile.before(step)
            metrics = trainer.train_step(batch)
            profile.after(step, metrics, trainer, batch)
            step_s = timer.after(metrics, trainer.compiled_last_step)
            if step_s is not None:
                say(expected_time(total - step - 1, step_s))
                log.step_s = step_s
            log.step(batch, trainer)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == total:
                log.line(done, total, metrics)

            # validation and evaluations
            if cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == total) and val_batches:
                ev = trainer.evaluate(val_batches)
                say(f"step {done} validation loss {ev['loss']:.6f} loc_accuracy {ev['loc_accuracy']:.3f}")
                log.last.update({f"val_{k}": v for k, v in ev.items()})
                log.scalars("val", ev, done)
            for e in evals:
                if e.due(done, total):
                    result = e(trainer.plain_params())
                    say(f"step {done} {e.describe(result)}")
                    log.last.update({f"eval_{e.name}_{k}": v for k, v in result.items()})
                    log.scalars(f"eval/{e.name}", result, done)

            # checkpoint; SIGTERM saves and stops
            stop = preemption.stop(done)  # read once: SIGTERM may land between the save and the check
            saved = checkpoints.save(done, trainer.checkpoint_state(), train.state, force=stop or done == total)
            if stop:
                stopped = True
                checkpoints.wait()  # "saved" only once the step is committed on disk
                if not (saved and checkpoints.committed(done)):
                    raise RuntimeError(f"stopping: the checkpoint of step {done} was not saved")
                say(f"{preemption.why}: saved step {done}, exiting (the same command resumes from it)")
                break
    finally:
        profile.close()
        checkpoints.wait()
        checkpoints.close()
        preemption.restore()
        train.close()
        log.close()

    if not stopped:
        export(export_dir, model, trainer, total, say)
    return {"history": log.history, "last": log.last}


def export(export_dir: str, model, trainer: Trainer, step: int, say) -> None:
    """Every process writes its own shards of the params; none gathers the model."""
    start = time.time()
    weights.save_checkpoint(export_dir, model.config, trainer.plain_params(), step=step)
    say(f"exported the params of step {step} to {export_dir} in {time.time() - start:.0f}s")


if __name__ == "__main__":  # a forked copy of this file runs as `python -m yourpkg.yourfile --config ...`
    from kosmos2_jax.train.launch import launch

    launch(run, train_step)
