"""The sharded train state: `Trainer` builds {step, params, opt_state} over `config.mesh` (fresh,
from given params, or abstract for a restore or a compile-only check), puts host batches on the
devices, and jits the step functions it is given with the state's shardings. The steps themselves
(`train_step`, `eval_step`, `loss_fn`) are plain functions in train/loop.py, beside the run.

`StepContext` is what a step reads besides the state and the batch: the model, the optimizer, the
trainable mask and the loss settings, all fixed for a run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from kosmos2_jax.models import Kosmos2
from kosmos2_jax.models import sharding
from kosmos2_jax.train import image_slots, lora
from kosmos2_jax.train.init import structured_init
from kosmos2_jax.train.loss import location_kernel
from kosmos2_jax.train.optim import make_optimizer, trainable_mask
from kosmos2_jax.utils.errors import UsageError

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "image_embeds_position_mask", "pixel_values",
              "segment_ids", "source_ids")  # segment_ids: packed rows only; `_put` may add image_index


def model_config(cfg, vocab_size: int):
    """The experiment config's `model` -> a Kosmos2Config (`text.vocab_size=-1`: the tokenizer's;
    the vision layers `train.freeze` freezes run without a backward)."""
    from kosmos2_jax.models import Kosmos2Config, TextConfig, VisionConfig

    text = dict(cfg.model.text)
    if text["vocab_size"] == -1:
        text["vocab_size"] = vocab_size
    elif text["vocab_size"] != vocab_size:
        raise UsageError(f"config model.text.vocab_size={text['vocab_size']} but the tokenizer has {vocab_size}")
    vision = VisionConfig(**dict(cfg.model.vision))
    freeze = cfg.train.freeze
    frozen = {"vision_except_last": vision.num_hidden_layers - 1, "all_but_resampler": vision.num_hidden_layers}
    return Kosmos2Config(vision=vision, text=TextConfig(**text),
                         latent_query_num=cfg.model.latent_query_num, dtype=cfg.model.dtype,
                         param_dtype=cfg.model.param_dtype, remat_policy=cfg.model.remat_policy,
                         scan_layers=cfg.model.scan_layers, attention_impl=cfg.model.attention_impl,
                         frozen_vision_layers=frozen.get(freeze, 0))


def model_init(model: Kosmos2):
    """rng -> the model's boxed params (`nn.LogicallyPartitioned`), from a one-image example."""
    c = model.config
    q = c.latent_query_num
    ids = jnp.ones((1, q + 4), jnp.int32)
    img = jnp.zeros((1, q + 4), jnp.int32).at[:, 2:2 + q].set(1)
    pix = jnp.zeros((1, c.vision.image_size, c.vision.image_size, c.vision.num_channels), jnp.float32)
    return lambda rng: model.init(rng, pix, ids, None, img)["params"]


LOSS_IMPLS = ("plain", "chunked")  # train.loss_impl: train/loss.py's cross_entropy | chunked_lm_head_loss


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What the step functions read besides the state and the batch, fixed for a run."""
    model: Kosmos2
    tx: optax.GradientTransformation
    schedule: Callable  # step -> learning rate (logged)
    mask: Any  # the trainable mask: a pytree like the params, 0 where frozen
    seed: int  # dropout keys are fold_in(PRNGKey(seed), step)
    first_location_id: int
    num_location_tokens: int
    location_weight: float  # train.location_loss_weight
    location_kernel: Any  # [L, L] soft location targets (train.location_sigma > 0), or None
    loss_impl: str  # train.loss_impl
    loss_chunk: int  # train.loss_chunk (the chunked loss only)
    grad_accum_steps: int
    batch_shards: int  # data x fsdp: micro-batches split each shard's rows
    num_sources: int  # training sources: per-source loss and tokens when the batch has source_ids


def _wholly_frozen(m) -> bool:
    return np.ndim(m) == 0 and float(m) == 0.0


def grad_of_trained(loss, mask):
    """`loss(params, *args) -> (value, aux)` -> `(params, *args) -> (grads, aux)` differentiated
    with respect to the trained leaves alone: wholly frozen ones (`mask` 0) are constants to it,
    so XLA drops their backward (with the vision tower frozen and its layers unscanned, the
    backward stops at the last trainable layer) and QLoRA's integer base weights are never
    differentiated; their gradients are zeros."""
    frozen = [_wholly_frozen(m) for m in jax.tree_util.tree_leaves(mask)]

    def grad_fn(params, *args):
        leaves, treedef = jax.tree_util.tree_flatten(params)

        def of_trained(trained):
            it = iter(trained)
            return loss(treedef.unflatten([leaf if f else next(it) for leaf, f in zip(leaves, frozen)]), *args)

        grads, aux = jax.grad(of_trained, has_aux=True)([leaf for leaf, f in zip(leaves, frozen) if not f])
        it = iter(grads)
        full = [jnp.zeros(leaf.shape, leaf.dtype if jnp.issubdtype(leaf.dtype, jnp.floating) else jnp.float32)
                if f else next(it) for leaf, f in zip(leaves, frozen)]
        return treedef.unflatten(full), aux

    return grad_fn


def apply_trained(params, updates, mask):
    """`optax.apply_updates` on the trained leaves; wholly frozen ones are returned as they are
    (no copy, and QLoRA's packed 4-bit weights have no `+`)."""
    return jax.tree_util.tree_map(lambda p, u, m: p if _wholly_frozen(m) else (p + u).astype(p.dtype),
                                  params, updates, mask)


class Trainer:
    """The sharded train state and the jitted steps over `config.mesh`. `abstract=True` builds the
    state as `jax.ShapeDtypeStruct`s with their shardings and allocates nothing (to restore a
    checkpoint into, or to compile for `devices` that are not attached: `train/compile_check.py`)."""

    def __init__(self, model: Kosmos2, config, first_location_id: int, num_location_tokens: int = 1024,
                 init_params: Any = None, abstract: bool = False, devices=None, sources: tuple = (),
                 train_step: Callable | None = None, eval_step: Callable | None = None):
        """`train_step(ctx, state, batch) -> (state, metrics)` and `eval_step(ctx, params, batch) ->
        metrics` (train/loop.py's, or a fork's) are jitted over the state's shardings; without
        them the trainer holds the state only (export, checkpoint restores)."""
        self.lora = config.train.lora if lora.enabled(config.train.get("lora")) else None
        self.model, self.config = lora.apply(model, self.lora), config  # Qwix's LoRA model, or `model`
        self.sources = tuple(sources)  # the training mixture's source names: per-source loss and tokens
        self.loc = (first_location_id, num_location_tokens)
        self.mesh = sharding.create_mesh(dict(config.mesh), devices)
        self.rules = sharding.rules_from_text(config.mesh.rules)
        self.batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp")))
        self.batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        accum = config.train.grad_accum_steps
        if accum > 1 and config.train.batch_size % (self.batch_shards * accum):
            raise UsageError(f"config.train.grad_accum_steps={accum}: each of the {self.batch_shards} batch shards "
                             f"holds {config.train.batch_size / self.batch_shards:g} of train.batch_size="
                             f"{config.train.batch_size} rows, which do not split into {accum} micro-batches")
        # compacted images: one block per micro-batch of each batch shard (`micro_batches`)
        self.image_groups = self.batch_shards * accum
        self.image_slots = 0  # image slots the vision tower ran on in the last batch put on the devices
        # A batch with another image capacity runs (and first compiles) another step program
        self._programs: set[int] = set()
        self.compiled_last_step = False
        self._init_state(init_params, abstract)
        self.ctx = self._step_context()
        self._step_fn = self._eval_fn = None
        if train_step is not None:
            self._step_fn = jax.jit(functools.partial(train_step, self.ctx),
                                    in_shardings=(self.state_shardings, self.batch_sharding),
                                    out_shardings=(self.state_shardings, None), donate_argnums=(0,))
        if eval_step is not None:
            self._eval_fn = jax.jit(functools.partial(eval_step, self.ctx),
                                    in_shardings=(self.state_shardings["params"], self.batch_sharding))

    # --- state ----------------------------------------------------------------------------
    def _init_state(self, init_params, abstract: bool = False):
        init = model_init(self.model)
        boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
        param_shardings = sharding.tree_shardings(boxed, self.mesh, self.rules)
        if self.lora is not None:  # the adapters alone train (train/lora.py)
            lora.require_adapters(nn.unbox(boxed), self.lora)
            self.mask = lora.trainable_mask(nn.unbox(boxed))
        else:
            self.mask = trainable_mask(nn.unbox(boxed), self.config.train.freeze, self.model.config.scan_layers)
        self.tx, self.schedule = make_optimizer(self.config.optim, self.mask)  # no state for frozen params
        opt_boxed = jax.eval_shape(self.tx.init, boxed)
        opt_shardings = sharding.tree_shardings(opt_boxed, self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, P())
        self.state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
        self.logical_params = boxed  # the parameters' logical axis names (compile_check's sharding table)
        if abstract:
            shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": nn.unbox(boxed),
                      "opt_state": nn.unbox(opt_boxed)}
            self.state = abstract_like(shapes, self.state_shardings)
            return
        with jax.set_mesh(self.mesh), sharding.logical_axis_rules(self.rules):
            if init_params is None:
                params = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=param_shardings)(
                    jax.random.PRNGKey(self.config.seed))
                i = self.config.init
                options = dict(positions=i.sincos_positions, locations=i.sincos_locations,
                               connector_dense_std=i.connector_dense_std)
                if any(options.values()):
                    options.update(location_frequencies=i.location_frequencies,
                                   position_frequencies=i.position_frequencies)
                    params = jax.device_put(structured_init(params, self.model.config, *self.loc, **options),
                                            param_shardings)
            elif self.lora is not None:  # given base weights, fresh adapters (B = 0)
                fresh = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=param_shardings)(
                    jax.random.PRNGKey(self.config.seed))
                params = jax.jit(lora.with_base, out_shardings=param_shardings)(fresh, nn.unbox(init_params))
            else:
                params = jax.device_put(nn.unbox(init_params), param_shardings)
            opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(params)
        self.state = {"step": jax.device_put(jnp.zeros((), jnp.int32), replicated), "params": params,
                      "opt_state": opt_state}

    def _step_context(self) -> StepContext:
        t = self.config.train
        side = int(round(self.loc[1] ** 0.5))
        return StepContext(
            model=self.model, tx=self.tx, schedule=self.schedule, mask=self.mask, seed=self.config.seed,
            first_location_id=self.loc[0], num_location_tokens=self.loc[1], location_weight=t.location_loss_weight,
            location_kernel=location_kernel(side, t.location_sigma) if t.location_sigma > 0 else None,
            loss_impl=t.loss_impl, loss_chunk=t.loss_chunk, grad_accum_steps=t.grad_accum_steps,
            batch_shards=self.batch_shards, num_sources=len(self.sources))

    def _put(self, batch):
        local = {k: np.asarray(batch[k]) for k in BATCH_KEYS if k in batch}
        local, self.image_slots = self._compact_images(local, batch.get("has_image"))
        if jax.process_count() == 1:
            return jax.device_put(local, self.batch_sharding)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    def _compact_images(self, local: dict, has_image):
        """The real images only, in one block per batch shard (`train.compact_images`,
        train/image_slots.py): -> (the batch to put, image slots the vision tower runs on here)."""
        pixels = local.get("pixel_values")
        if pixels is None:
            return local, 0
        slots = pixels.shape[0] * (pixels.shape[1] if pixels.ndim == 5 else 1)
        groups = self.image_groups // jax.process_count()  # 0: a batch shard spans processes
        if (not self.config.train.compact_images or has_image is None or groups == 0
                or pixels.shape[0] % groups):
            return local, slots
        counts = image_slots.image_counts(pixels, has_image)
        needed = int(counts.reshape(groups, -1).sum(axis=1).max())
        if jax.process_count() > 1:  # every process compiles the same shapes
            needed = int(np.max(multihost_utils.process_allgather(np.int32(needed))))
        cap = image_slots.capacity(needed, slots // groups)
        if cap == slots // groups:
            return local, slots
        local["pixel_values"], local["image_index"] = image_slots.compact_images(pixels, counts, groups, cap)
        return local, groups * cap

    def train_step(self, batch) -> dict:
        if self._step_fn is None:
            raise RuntimeError("this Trainer was built without a train_step")
        with jax.set_mesh(self.mesh), sharding.logical_axis_rules(self.rules):
            put = self._put(batch)
            self.compiled_last_step = self.image_slots not in self._programs
            self._programs.add(self.image_slots)
            self.state, metrics = self._step_fn(self.state, put)
        return metrics

    def parameter_counts(self) -> tuple[int, int]:
        """(all parameters, trainable ones): a frozen leaf's mask is 0, a partly frozen stack's is per layer."""
        params, total, trainable = self.state["params"], 0, 0
        for p, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(self.mask)):
            n = int(np.prod(p.shape))
            total += n
            m = np.asarray(m, np.float64)
            trainable += int(round(n * float(m.mean()))) if m.ndim else n * int(float(m) != 0.0)
        return total, trainable

    # --- checkpoints ------------------------------------------------------------------------
    def checkpoint_state(self, state=None):
        """What a checkpoint holds of `state` (default: the trainer's): all of it, or with LoRA the
        state less the frozen base (the adapters, their optimizer state, the step); the base is the
        run's initial weights (`config.init`, else its seed), rebuilt when the run resumes."""
        state = self.state if state is None else state
        return state if self.lora is None else dict(state, params=lora.adapters(state["params"]))

    def restore(self, checkpoints, step: int) -> None:
        """The train state of checkpoint `step` into this trainer (its shardings)."""
        restored = checkpoints.restore(step, abstract_like(self.checkpoint_state(),
                                                           self.checkpoint_state(self.state_shardings)))
        if self.lora is not None:
            restored["params"] = lora.with_adapters(self.state["params"], restored["params"])
        self.state = restored

    def plain_params(self):
        """The params for the model without adapters: LoRA's merged in (on the devices, sharded)."""
        if self.lora is None:
            return self.state["params"]
        shardings = sharding.tree_shardings(sharding.logical_params(lora.base_model(self.model)), self.mesh,
                                            self.rules)
        merge = jax.jit(functools.partial(lora.merge, lora=self.lora), out_shardings=shardings)
        with jax.set_mesh(self.mesh):
            return merge(self.state["params"])

    def optimizer_state_bytes(self) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.state["opt_state"]))

    def step_hlo(self, batch) -> str:
        """The optimized HLO of the compiled train step for this batch's shapes (from jit's cache,
        not compiled again once the step has run)."""
        with jax.set_mesh(self.mesh), sharding.logical_axis_rules(self.rules):
            return self._step_fn.lower(self.state, self._put(batch)).compile().as_text()

    def evaluate(self, batches) -> dict:
        if self._eval_fn is None:
            raise RuntimeError("this Trainer was built without an eval_step")
        totals = {}
        with jax.set_mesh(self.mesh), sharding.logical_axis_rules(self.rules):
            for batch in batches:
                m = jax.device_get(self._eval_fn(self.state["params"], self._put(batch)))
                for k, v in m.items():
                    totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
        tokens = max(float(totals.get("tokens", 0.0)), 1.0)
        return {"loss": float(totals.get("nll_sum", 0.0)) / tokens,
                "loc_accuracy": float(totals.get("loc_correct", 0.0)) / max(float(totals.get("loc_tokens", 0.0)), 1.0)}


def micro_batches(x, accum: int, shards: int):
    """[N, ...] -> [accum, N / accum, ...], micro-batch i being the i-th 1/accum of every batch
    shard's rows (strided over the batch, not its contiguous i-th 1/accum): each micro-batch stays
    on the devices that hold it, so no micro-step moves data between them. Batch arrays whose
    leading axis is split in shards (rows, compacted images, image blocks) all split alike."""
    n = x.shape[0]
    x = x.reshape(shards, accum, n // (shards * accum), *x.shape[1:]).swapaxes(0, 1)
    x = x.reshape(accum, n // accum, *x.shape[3:])
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        x = jax.lax.with_sharding_constraint(x, P(None, ("data", "fsdp")))
    return x


def accumulate_gradients(grad_fn, params, batch, rng, accum: int, shards: int):
    """`grad_fn(params, batch, rng) -> (grads, metrics)` summed over `accum` micro-batches of
    `batch` (`micro_batches`) in a `lax.scan`, micro-batch i with dropout key fold_in(rng, i)."""
    micro = jax.tree_util.tree_map(lambda x: micro_batches(x, accum, shards), batch)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first, rng))

    def body(acc, xs):
        b, i = xs
        out = grad_fn(params, b, jax.random.fold_in(rng, i))
        return jax.tree_util.tree_map(jnp.add, acc, out), None

    return jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))[0]


def abstract_like(state, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def input_counts(batch, image_slots: int | None = None) -> np.ndarray:
    """[real tokens, token positions, real images, image slots] of a host batch: how much of what
    the step computes is data. `image_slots` is what the vision tower ran on (`Trainer.image_slots`
    after the step); by default every slot of `pixel_values` ([B, slots, ...] when packed, [B, ...]
    otherwise, text-only rows included), as without `train.compact_images`."""
    mask = np.asarray(batch["attention_mask"])
    pixels = batch.get("pixel_values")
    if image_slots is None:
        image_slots = 0 if pixels is None else mask.shape[0] * (pixels.shape[1] if np.ndim(pixels) == 5 else 1)
    images = 0 if pixels is None else int(np.asarray(batch["has_image"]).sum())
    return np.array([mask.sum(), mask.size, images, image_slots], np.float64)


def source_examples(batch, num_sources: int) -> np.ndarray:
    """[num_sources + 1] examples per source in a host batch (index 0 unused): one per row, or per
    segment of a packed row, counted for the source of its first token."""
    src = np.asarray(batch["source_ids"])
    seg = batch.get("segment_ids")
    if seg is None:
        first = src[:, 0]
    else:
        seg = np.asarray(seg)
        starts = (seg != 0) & (seg != np.pad(seg, ((0, 0), (1, 0)))[:, :-1])
        first = src[starts]
    return np.bincount(first.ravel(), minlength=num_sources + 1)[:num_sources + 1].astype(np.float64)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
