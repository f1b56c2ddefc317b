"""An experiment config checked before any work: every numeric setting against its range, and a
resumed run against the config it was started with.

`check(cfg)` raises a `UsageError` naming the first bad key, its value and the allowed range.
Every key of `presets.base()` must be in the config (a config is a diff on it: the one place
defaults live), so library code reads `cfg.train.x`, never `cfg.get("x", default)`.
"""

from __future__ import annotations

import math
import os

from kosmos2_jax.utils.errors import UsageError


_INT, _NUM = "an integer", "a number"
# key: (kind, low, high, low is open)  (None: unbounded)
RANGES = {
    "train.batch_size": (_INT, 1, None, False),
    "train.steps": (_INT, 1, None, False),
    "mesh.dcn_data": (_INT, 1, None, False),
    "train.grad_accum_steps": (_INT, 1, None, False),
    "train.lora.rank": (_INT, 0, None, False),
    "train.lora.alpha": (_NUM, 0.0, None, True),
    "train.log_every": (_INT, 1, None, False),
    "train.eval_every": (_INT, 0, None, False),
    "train.ckpt_every": (_INT, 1, None, False),
    "train.keep": (_INT, 1, None, False),
    "train.location_loss_weight": (_NUM, 0.0, None, False),
    "train.location_sigma": (_NUM, 0.0, None, False),
    "train.loss_chunk": (_INT, 1, None, False),
    "train.profile_start": (_INT, 0, None, False),
    "train.resume_step": (_INT, 0, None, False),
    "train.profile_steps": (_INT, 1, None, False),
    "num_location_tokens": (_INT, 4, None, False),
    "model.vision.hidden_size": (_INT, 1, None, False),
    "model.vision.intermediate_size": (_INT, 1, None, False),
    "model.vision.num_hidden_layers": (_INT, 1, None, False),
    "model.vision.num_attention_heads": (_INT, 1, None, False),
    "model.vision.image_size": (_INT, 1, None, False),
    "model.vision.patch_size": (_INT, 1, None, False),
    "model.vision.attention_dropout": (_NUM, 0.0, 1.0, False),
    "model.text.max_position_embeddings": (_INT, 1, None, False),
    "model.text.embed_dim": (_INT, 1, None, False),
    "model.text.layers": (_INT, 1, None, False),
    "model.text.ffn_dim": (_INT, 1, None, False),
    "model.text.attention_heads": (_INT, 1, None, False),
    "model.text.dropout": (_NUM, 0.0, 1.0, False),
    "model.text.attention_dropout": (_NUM, 0.0, 1.0, False),
    "model.latent_query_num": (_INT, 1, None, False),
    "data.seq_len": (_INT, 2, None, False),
    "data.val_batches": (_INT, 0, None, False),
    "data.score_threshold": (_NUM, 0.0, 1.0, False),
    "data.grounded_prob": (_NUM, 0.0, 1.0, False),
    "data.shuffle_buffer": (_INT, 1, None, False),
    "data.num_workers": (_INT, 0, None, False),
    "data.max_bad_fraction": (_NUM, 0.0, 1.0, False),
    "data.pack_max_images": (_INT, 1, None, False),
    "data.shards": (_INT, 0, None, False),
    "optim.lr": (_NUM, 0.0, None, False),  # 0: a run that only evaluates or exports
    "optim.warmup_steps": (_INT, 0, None, False),
    "optim.b1": (_NUM, 0.0, 1.0, False),
    "optim.b2": (_NUM, 0.0, 1.0, False),
    "optim.eps": (_NUM, 0.0, None, True),
    "optim.weight_decay": (_NUM, 0.0, None, False),
    "optim.clip_norm": (_NUM, 0.0, None, False),
    "optim.muon_ns_steps": (_INT, 1, None, False),
    "optim.total_steps": (_INT, 1, None, False),
}


# Settings that change the train state's tree (so a checkpoint could not restore into it).
STATE_LAYOUT_KEYS = ("model.scan_layers", "model.param_dtype", "train.freeze", "num_location_tokens",
                     "optim.optimizer", "train.lora.rank", "train.lora.targets", "train.lora.base_dtype")


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _range(kind, lo, hi, lo_open) -> str:
    low = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
    high = "" if hi is None else f"<= {hi}"
    return f"{kind} " + " and ".join(x for x in (low, high) if x)


def missing_keys(cfg) -> list[str]:
    """The keys of `presets.base()` the config lacks (the entries of `data.sources` and `evals` are
    the config's own; each entry's keys are checked against `presets.source` / `presets.evaluation`)."""
    from kosmos2_jax.train import presets

    have = set(flat(cfg))
    wanted = {k for k in flat(presets.base()) if not k.startswith(("data.sources.", "evals."))}
    for group, make in (("data.sources", presets.source("grit", 1.0)), ("evals", presets.evaluation("shapes"))):
        entries = _get(cfg, group)
        for name in ([] if entries is _MISSING else entries.keys()):
            wanted |= {f"{group}.{name}.{k}" for k in make.keys()}
    return sorted(wanted - have)


def check(cfg, need_tokenizer: bool = True, need_data: bool = True) -> None:
    """UsageError on a config that lacks keys of `presets.base()`, then on the first setting out of
    its range (or of the wrong type)."""
    missing = missing_keys(cfg)
    if missing:
        raise UsageError(f"the config lacks {len(missing)} key(s) of presets.base(): {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}; build it on kosmos2_jax.train.presets.base()")
    for key, (kind, lo, hi, lo_open) in RANGES.items():
        value = _get(cfg, key)
        if value is _MISSING:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind == _INT:
            ok = float(value).is_integer()
        if ok:
            ok = math.isfinite(value) and (lo is None or (value > lo if lo_open else value >= lo)) \
                and (hi is None or value <= hi)
        if not ok:
            raise UsageError(f"config.{key}={value!r}: must be {_range(kind, lo, hi, lo_open)}")
    for axis in ("data", "fsdp", "tensor"):
        value = _get(cfg, f"mesh.{axis}")
        if value is not _MISSING and (not isinstance(value, int) or (value < 1 and value != -1)):
            raise UsageError(f"config.mesh.{axis}={value!r}: must be >= 1, or -1 (the devices left)")
    locations = _get(cfg, "num_location_tokens")
    if locations is not _MISSING and math.isqrt(int(locations)) ** 2 != locations:
        raise UsageError(f"config.num_location_tokens={locations}: must be a square (a P x P grid of locations)")
    decay_mask = _get(cfg, "optim.weight_decay_mask")
    if decay_mask is not _MISSING:
        from kosmos2_jax.train.optim import WEIGHT_DECAY_MASKS

        if decay_mask not in WEIGHT_DECAY_MASKS:
            raise UsageError(f"config.optim.weight_decay_mask={decay_mask!r}: must be one of {', '.join(WEIGHT_DECAY_MASKS)}")
    freeze = _get(cfg, "train.freeze")
    if freeze is not _MISSING:
        from kosmos2_jax.train.optim import FREEZE_MODES

        if freeze not in FREEZE_MODES:
            raise UsageError(f"config.train.freeze={freeze!r}: must be one of {', '.join(FREEZE_MODES)}")
    lora = _get(cfg, "train.lora")
    if lora is not _MISSING:
        from kosmos2_jax.train import lora as lora_lib

        lora_lib.check(lora)
        if lora_lib.enabled(lora) and freeze not in (_MISSING, "none"):
            raise UsageError(f"config.train.freeze={freeze!r} with train.lora.rank={lora.rank}: LoRA trains the "
                             f"adapters alone (everything else is frozen); leave train.freeze='none'")
    optimizer = _get(cfg, "optim.optimizer")
    if optimizer is not _MISSING:
        from kosmos2_jax.train.optim import OPTIMIZERS

        if optimizer not in OPTIMIZERS:
            raise UsageError(f"config.optim.optimizer={optimizer!r}: must be one of {', '.join(OPTIMIZERS)}")
        if optimizer == "muon" and decay_mask not in (_MISSING, "all"):
            raise UsageError(f"config.optim.weight_decay_mask={decay_mask!r}: optim.optimizer=muon decays every "
                             "parameter (weight_decay_mask=all)")
    loss_impl = _get(cfg, "train.loss_impl")
    if loss_impl is not _MISSING:
        from kosmos2_jax.train.trainer import LOSS_IMPLS

        if loss_impl not in LOSS_IMPLS:
            raise UsageError(f"config.train.loss_impl={loss_impl!r}: must be one of {', '.join(LOSS_IMPLS)}")
    decay = _get(cfg, "optim.decay")
    if decay is not _MISSING:
        from kosmos2_jax.train.optim import DECAYS

        if decay not in DECAYS:
            raise UsageError(f"config.optim.decay={decay!r}: must be one of {', '.join(DECAYS)}")
    multipliers = _get(cfg, "optim.lr_multipliers")
    if multipliers is not _MISSING:
        from kosmos2_jax.train.optim import parse_lr_multipliers

        _parses(parse_lr_multipliers, multipliers, "config.")
    batch, accum = _get(cfg, "train.batch_size"), _get(cfg, "train.grad_accum_steps")
    if accum is not _MISSING and batch % accum:
        raise UsageError(f"config.train.grad_accum_steps={accum}: must divide train.batch_size={batch}")
    sources = _get(cfg, "data.sources")
    if sources is not _MISSING:
        _check_sources(sources, need_data, bool(_get(cfg, "data.pack") is True))
    evals = _get(cfg, "evals")
    for name in ([] if evals is _MISSING else sorted(evals)):
        _check_eval(name, evals[name])
    rules = _get(cfg, "mesh.rules")
    if rules is not _MISSING:
        from kosmos2_jax.models.sharding import rules_from_text

        _parses(rules_from_text, rules, f"config.mesh.rules={rules!r}: ")
    tokenizer = _get(cfg, "tokenizer")
    if need_tokenizer and tokenizer is not _MISSING and not os.path.isfile(tokenizer):
        raise UsageError(f"config.tokenizer={tokenizer!r}: no such file (a sentencepiece model; the demo's is "
                         f"built by `make demo`)")


def _parses(parse, text, prefix: str) -> None:
    """`parse(text)`, its ValueError a one-line UsageError starting with `prefix`."""
    try:
        parse(text)
    except ValueError as e:
        raise UsageError(f"{prefix}{e}") from None


def _check_sources(sources, need_data: bool = True, packed: bool = False) -> None:
    from kosmos2_jax.data.annotations import ANNOTATION_KINDS
    from kosmos2_jax.data.pipeline import RECORD_KINDS, SOURCE_KINDS

    active = 0
    for name in sorted(sources):
        s, key = sources[name], f"config.data.sources.{name}"
        if s.get("kind") not in SOURCE_KINDS:
            raise UsageError(f"{key}.kind={s.get('kind')!r}: must be one of {', '.join(SOURCE_KINDS)}")
        if not (s.get("data_dir") or s.get("path")):
            continue  # not in the mixture
        active += 1
        weight = s.get("weight")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight <= 0:
            raise UsageError(f"{key}.weight={weight!r}: must be a number > 0 for a source in the mixture "
                             f"(empty its data_dir/path to drop it)")
        if s.kind == "interleaved" and not packed:
            raise UsageError(f"{key}: interleaved documents need packed rows (a row holds several of their "
                             f"images): set config.data.pack=True")
        if not need_data:
            continue
        if s.kind in ("interleaved", *ANNOTATION_KINDS):
            if not (s.get("path") and s.get("data_dir")):
                what = ("documents ({key}.path, a JSONL file or a folder of them)" if s.kind == "interleaved" else
                        "an annotation file ({key}.path)").format(key=key)
                raise UsageError(f"{key}: kind {s.kind} reads {what} with their images in {key}.data_dir: set both")
            if not os.path.exists(os.path.expanduser(s.path)):
                raise UsageError(f"{key}.path={s.path!r}: no such file or folder")
            if not os.path.isdir(os.path.expanduser(s.data_dir)):
                raise UsageError(f"{key}.data_dir={s.data_dir!r}: no such folder")
            continue
        if s.kind in RECORD_KINDS and not s.get("data_dir"):
            raise UsageError(f"{key}: kind {s.kind} reads a prepared tfds folder: set {key}.data_dir")
        if s.kind not in RECORD_KINDS and not s.get("path"):
            raise UsageError(f"{key}: kind {s.kind} reads a file: set {key}.path")
        if s.get("data_dir") and not os.path.isdir(os.path.expanduser(s.data_dir)):
            raise UsageError(f"{key}.data_dir={s.data_dir!r}: no such folder")
        if s.get("path") and not os.path.isfile(os.path.expanduser(s.path)):
            raise UsageError(f"{key}.path={s.path!r}: no such file")
    if not active and need_data:
        raise UsageError("config.data.sources: no source has its data_dir or path set (e.g. "
                         "--config.data.sources.train.data_dir=TFDS/grit/1.0.0)")


EVAL_RANGES = {"every": 0, "max_items": 1, "batch_size": 1}


def _check_eval(name: str, spec) -> None:
    from kosmos2_jax.evaluation.tasks import TASKS

    for key, low in EVAL_RANGES.items():
        value = spec.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UsageError(f"config.evals.{name}.{key}={value!r}: must be an integer >= {low}")
    if spec.get("task") not in TASKS:
        raise UsageError(f"config.evals.{name}.task={spec.get('task')!r}: must be one of {', '.join(sorted(TASKS))}")
    if spec.get("every") and spec.get("data_dir") and not os.path.isdir(spec.data_dir):
        raise UsageError(f"config.evals.{name}.data_dir={spec.data_dir!r}: no such folder")


def flat(cfg) -> dict:
    """A (nested) config as {"a.b.c": value}."""
    out = {}

    def walk(node, prefix):
        for k in node.keys():
            v = node[k]
            if hasattr(v, "keys"):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
    walk(cfg, "")
    return out


def changes(saved: dict, cfg) -> list[str]:
    """`key: saved -> now` for each setting a resumed run changes (from the saved config.json)."""
    before = flat(saved)
    now = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flat(cfg).items()}
    return [f"{k}: {before.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}"
            for k in sorted(set(before) | set(now)) if before.get(k, "(absent)") != now.get(k, "(absent)")]
