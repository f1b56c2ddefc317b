"""What every experiment config (`experiments/*.py`) builds on: the released model, the paper's
pretraining settings (Table 7, the released train.sh), the evaluations a run can schedule, the
`:runlocal` shrink, and `parse_arg` for `--config FILE:ARG` variants.

`base()` is the full-size pretraining config with every key a run reads, so a config is a short
diff on it and `--print_config` lists the same keys everywhere.
"""

from __future__ import annotations

import ml_collections

from kosmos2_jax.train.lora import DEFAULT_TARGETS as DEFAULT_LORA_TARGETS

from kosmos2_jax.utils.errors import UsageError

# Table 7 / train.sh, one place: the pretraining config takes them as they are and a test reads them.
PAPER_PRETRAIN = dict(
    lr=2e-4, warmup_steps=375, steps=60000, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, clip_norm=2.0,
    dropout=0.1, seq_len=2048, num_location_tokens=1024, latent_query_num=64, score_threshold=0.65,
    span_mode="expression", grounded_prob=0.5, tokens_per_step=419_000,
    # sequences per step by source (Table 7)
    batch_text=93, batch_caption=1117, batch_grounded=1117, batch_interleaved=47)

DEMO_DATA = "workdir/demo_data"  # what `make demo-data` writes: tokenizer and shapes datasets


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """`--config FILE:ARG` -> settings, as big_vision's `parse_arg`: ARG is `key=value` or `flag`
    items joined by commas (`runlocal,data=/tmp/d`); values take their default's type; an unknown
    key is an error naming the known ones."""
    out = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise UsageError(f"config argument {item!r}: unknown key {key!r}; known: {', '.join(sorted(defaults))}")
        kind = type(defaults[key])
        if kind is bool:
            if eq and value.lower() not in ("true", "false", "1", "0"):
                raise UsageError(f"config argument {item!r}: {key} is true or false")
            out[key] = (not eq) or value.lower() in ("true", "1")
        else:
            if not eq:
                raise UsageError(f"config argument {item!r}: give {key}=VALUE")
            try:
                out[key] = kind(value)
            except ValueError:
                raise UsageError(f"config argument {item!r}: {key} takes a {kind.__name__}") from None
    return out


def kosmos2_1p6b() -> ml_collections.ConfigDict:
    """The released architecture (microsoft/kosmos-2-patch14-224; `models.kosmos2_1p6b()`, HF's
    `Kosmos2Config()`), with the pretraining's compute settings."""
    return ml_collections.ConfigDict(dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=224, patch_size=14, attention_dropout=0.0),
        text=dict(vocab_size=65037, max_position_embeddings=2048, embed_dim=2048, layers=24, ffn_dim=8192,
                  attention_heads=32, dropout=PAPER_PRETRAIN["dropout"], attention_dropout=PAPER_PRETRAIN["dropout"]),
        latent_query_num=PAPER_PRETRAIN["latent_query_num"],
        dtype="bfloat16", param_dtype="float32",
        remat_policy="dots_with_no_batch_dims",
        scan_layers=True,  # one compiled layer for 24
        # "einsum" (HF's numerics, attention dropout) | "xla" | "cudnn" (fused flash attention on
        # GPUs, no attention dropout): models/config.py ATTENTION_IMPLS
        attention_impl="einsum"))


def source(kind: str, weight: float, data_dir: str = "", path: str = "", split: str = "train"
           ) -> ml_collections.ConfigDict:
    """One entry of `config.data.sources` (`data.pipeline.SOURCE_KINDS`): `data_dir` a prepared tfds
    folder (grit, caption, grit_instruct) or an image folder (llava, interleaved), `path` a file
    (text, llava, flan, unnatural_instructions; interleaved: a JSONL file or a folder of them). A source is in the mixture when its folder or file is set; `weight`s
    are relative (normalized over the sources in the mixture)."""
    return ml_collections.ConfigDict(dict(kind=kind, weight=float(weight), data_dir=data_dir, path=path, split=split))


def evaluation(task: str, data_dir: str = "", split: str = "validation", every: int = 0, max_items: int = 64,
               batch_size: int = 32, image_dir: str = "") -> ml_collections.ConfigDict:
    """One entry of `config.evals`: any `python -m kosmos2_jax.evaluate` task, run on the training
    params every `every` steps (0: off) over the first `max_items` items of `split` in `data_dir`."""
    return ml_collections.ConfigDict(dict(task=task, data_dir=data_dir, split=split, every=every,
                                          max_items=max_items, batch_size=batch_size, image_dir=image_dir))


def base() -> ml_collections.ConfigDict:
    """KOSMOS-2 pretraining at full size (Table 7), without data paths."""
    p = PAPER_PRETRAIN
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.tokenizer = "sentencepiece.bpe.model"  # the released one (microsoft/kosmos-2-patch14-224)
    c.num_location_tokens = p["num_location_tokens"]
    # Several processes: distributed=True; on TPU / Slurm / Open MPI the rest is detected, elsewhere
    # set coordinator_address ("host:port"), num_processes and process_id per process.
    c.distributed = False
    c.coordinator_address = ""
    c.num_processes = 0
    c.process_id = -1

    c.model = kosmos2_1p6b()
    # The released model's init (HF's). From scratch, train/init.py's 2-D sin-cos tables and a
    # stronger resampler projection help (the demo's).
    c.init = ml_collections.ConfigDict(dict(hf_dir="", checkpoint="", sincos_positions=False, sincos_locations=False,
                                            connector_dense_std=0.0, location_frequencies="log",
                                            position_frequencies="log"))

    c.data = ml_collections.ConfigDict(dict(
        # The training mixture: every source with its folder or file set, weighted relative to the
        # others. Table 7 per step: grounded pairs 1,117, image-caption pairs 1,117, text 93,
        # interleaved documents 47 (row-sized chunks of them). The instruction kinds are Table 8's
        # (kosmos2_instruct.py). Source names key the saved data position: keep them on resume.
        sources=dict(
            train=source("grit", p["batch_grounded"]),  # grounded image-text pairs (GRIT-schema tfds folder)
            caption=source("caption", p["batch_caption"]),  # image-caption pairs, plain (GRIT-schema tfds folder)
            text=source("text", p["batch_text"]),  # a text corpus, one example per line
            interleaved=source("interleaved", p["batch_interleaved"]),  # MMC4/OBELICS JSONL (path) + images (data_dir)
            grounded_instruct=source("grit_instruct", 0.0),  # Table 9 instructions from GRIT-schema records
            llava=source("llava", 0.0),  # LLaVA-Instruct JSON (path) + its images (data_dir)
            flan=source("flan", 0.0),  # FLANv2 inputs/targets JSONL
            unnatural_instructions=source("unnatural_instructions", 0.0)),  # Unnatural Instructions JSONL
        val_dir="", val_split="validation", val_batches=4,
        seq_len=p["seq_len"], preprocess="resize_shorter_center_crop", span_mode=p["span_mode"],
        score_threshold=p["score_threshold"], grounded_prob=p["grounded_prob"], box_formula="train",
        shuffle_buffer=10000, num_workers=16, max_bad_fraction=0.05,
        # sequence packing: several examples per row (up to pack_max_images images), kept apart by
        # segment ids. ~100-token grounded captions in 2048-token rows: 208 rows x 2048 tokens
        # = 426K tokens/step, the paper's ~419K
        pack=True, pack_max_images=24,
        # host shards the data is read as (0: one per process); each process reads shards/processes
        # of them. A checkpoint resumes on any process count dividing it; set it to a pod's host
        # count to replay that pod's exact batches on one machine
        shards=0))

    c.optim = ml_collections.ConfigDict(dict(
        lr=p["lr"], warmup_steps=p["warmup_steps"], b1=p["b1"], b2=p["b2"], eps=p["eps"],
        weight_decay=p["weight_decay"], clip_norm=p["clip_norm"],
        decay="linear",  # after the warm-up, to zero at the last step: "linear" (the paper's) or "cosine"
        # "all": every parameter decays, as in the released training code; "matrices": kernels and
        # embeddings only (train/optim.py)
        weight_decay_mask="all",
        # "adamw" (the paper's), or "muon": the dense kernels by Muon (optax.contrib, updates scaled
        # to AdamW's RMS, so the same lr serves), everything else by AdamW (train/optim.py)
        optimizer="adamw",
        # Newton-Schulz iterations that orthogonalize each Muon update (optimizer="muon" only)
        muon_ns_steps=5,
        # per-parameter learning-rate factors, "REGEX=FACTOR,...": the first pattern found in a
        # parameter's path ("image_to_text_projection/x_attn/q_proj/kernel") scales its learning
        # rate; "" (or no match): 1 (train/optim.py)
        lr_multipliers=""))

    c.train = ml_collections.ConfigDict(dict(
        batch_size=208, steps=p["steps"], grad_accum_steps=1, freeze="none", log_every=50, eval_every=2000,
        ckpt_every=1000, keep=3, async_ckpt=True,
        # 0: resume from the latest checkpoint; N: from step N (later steps are moved aside)
        resume_step=0,
        # 1.0: the paper's plain LM loss; > 1 weights location-token targets more (the demo's 2.0)
        location_loss_weight=1.0,
        # > 0: location targets are a 2-D Gaussian of this many grid cells around the true cell
        # (train/loss.py); 0: the paper's one-hot targets.
        location_sigma=0.0,
        # "plain": cross-entropy on the full [B, T, vocab] logits, jax.grad for the backward (the one
        # to change); "chunked": the same loss through the LM head in chunks of `loss_chunk` positions
        # per row, only where there are targets, with a hand-written gradient (train/loss.py): the
        # full-size experiment configs switch it on (docs/training.md, the compile-only memory table)
        loss_impl="plain", loss_chunk=64,
        # The vision tower runs on the real images only, not on empty image slots (train/image_slots.py).
        compact_images=True,
        # > 0: trace steps [profile_start, profile_start + profile_steps) into WORKDIR/profile and print
        # where their time went, by model part and kind of op (train/profiling.py).
        profile_start=0, profile_steps=3))
    # LoRA / QLoRA through Qwix (train/lora.py): rank > 0 trains adapters on the `targets` layers
    # (a regex fully matching module paths) and nothing else; base_dtype int8 or nf4 holds the
    # adapted kernels quantized (QLoRA). `export` merges the adapters into plain params.
    c.train.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=DEFAULT_LORA_TARGETS,
                                                  base_dtype="float"))
    c.optim.total_steps = c.train.get_ref("steps")  # linear decay to zero at the last step

    # Evaluations inside training, any `evaluate` task: --config.evals.grounding.task=refcoco
    # --config.evals.grounding.data_dir=MDETR --config.evals.grounding.every=1000 (results in the
    # console and TensorBoard's eval/NAME/METRIC).
    c.evals = ml_collections.ConfigDict(dict(grounding=evaluation("refcocog", split="val")))
    # (data, fsdp, tensor) mesh sizes within a slice, -1 = the remaining devices; `dcn_data`: slices
    # (TPU) or processes (elsewhere) joined by the data-center network, data-parallel across them;
    # `rules`: extra logical-axis rules over models/sharding.py's DEFAULT_RULES, as
    # "logical=mesh_axis" items ("embed=fsdp,mlp=tensor"; "none" for replicated)
    c.mesh = ml_collections.ConfigDict(dict(dcn_data=1, data=1, fsdp=-1, tensor=1, rules=""))
    return c


def demo_data(root: str = DEMO_DATA) -> dict:
    """What `make demo-data` writes under `root`: the tokenizer and the shapes datasets' folders."""
    root = str(root).rstrip("/")
    return {"tokenizer": f"{root}/spm/shapes.model", "grounded": f"{root}/tfds/shapes/grounded/1.0.0",
            "refexp": f"{root}/tfds/shapes/refexp/1.0.0"}


def runlocal(c: ml_collections.ConfigDict, data_root: str = DEMO_DATA) -> ml_collections.ConfigDict:
    """Any config, shrunk to run a few steps on a CPU in well under a minute: a tiny model of the
    same kind (scanned or not, its attention implementation, freezing, packing) on the demo's
    data and tokenizer (`make demo-data`), with its evaluations on the shapes `refexp` split."""
    demo = demo_data(data_root)
    grounded, refexp = demo["grounded"], demo["refexp"]
    c.tokenizer = demo["tokenizer"]
    c.num_location_tokens = 256
    c.model.vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8)
    c.model.text.update(vocab_size=-1, max_position_embeddings=256, embed_dim=64, layers=2, ffn_dim=128,
                        attention_heads=4)
    c.model.update(latent_query_num=8, dtype="float32", remat_policy="none")
    c.init.update(hf_dir="", checkpoint="")
    for entry in c.data.sources.values():  # the demo's records for every weighted record source, no files
        if entry.kind in ("coco", "odvg", "refexp") and entry.weight > 0:  # box annotations: the demo has none
            entry.kind = "grit"
        entry.update(data_dir=grounded if entry.kind in ("grit", "caption", "grit_instruct") and entry.weight > 0
                     else "", path="", split="train")
    c.data.update(val_dir=grounded, seq_len=64, shuffle_buffer=16, num_workers=2, val_batches=1, pack_max_images=2,
                  val_split="validation")
    c.train.update(batch_size=8, steps=3, log_every=1, eval_every=3, ckpt_every=3, keep=1, async_ckpt=False,
                   loss_chunk=8, profile_start=0,
                   compact_images=False)  # one step program to compile, not one per image count
    c.optim.update(warmup_steps=1)
    for name in c.evals:
        c.evals[name].update(task="shapes", data_dir=refexp, split="validation", every=3, max_items=4, batch_size=4,
                             image_dir="")
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c
