"""Export the params of a training run's checkpoint (no optimizer state), and optionally HF files.

    python -m kosmos2_jax.export --workdir workdir/shapes_tiny [--step N] --out ckpt/ [--hf_out hf/]

Reads WORKDIR/config.json and WORKDIR/model_config.json (written by `kosmos2_jax.train`) and the
Orbax checkpoint of step N (default: the latest) under WORKDIR/checkpoints. `--out` is a params
checkpoint that `predict`, `evaluate`, `convert to-hf` and `--config.init.checkpoint` read;
`--hf_out` writes config.json + model.safetensors for `Kosmos2ForConditionalGeneration`.
A LoRA run's adapters are merged into the params (`--adapters_only`: the adapters alone, with
lora.json giving rank, alpha, targets and base dtype).
Both are written beside their place and moved there when complete; an existing non-empty one is
refused unless `--overwrite` is given.
"""

from __future__ import annotations

import os
import sys


def export(workdir: str, out: str, step: int | None = None, hf_out: str = "", overwrite: bool = True,
           adapters_only: bool = False) -> int:
    import jax
    import ml_collections

    from kosmos2_jax import weights
    from kosmos2_jax.utils.errors import UsageError
    from kosmos2_jax.utils import outputs
    from kosmos2_jax.models import Kosmos2, Kosmos2Config
    from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer
    from kosmos2_jax.train.checkpoints import Checkpoints
    from kosmos2_jax.train import lora
    from kosmos2_jax.train.trainer import Trainer

    paths = [os.path.join(workdir, n) for n in ("config.json", "model_config.json")]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: is {workdir!r} a kosmos2_jax.train workdir?")
    for path in [out] + ([hf_out] if hf_out else []):
        outputs.refuse_existing(path, overwrite, "--out" if path == out else "--hf_out")
    cfg = ml_collections.ConfigDict(weights.read_json(paths[0], "the run config"))
    adapter = cfg.train.lora if lora.enabled(cfg.train.get("lora")) else None
    if adapters_only and adapter is None:
        raise UsageError(f"--adapters_only: the run in {workdir!r} has no LoRA adapters (train.lora.rank=0)")
    if adapters_only and hf_out:
        raise UsageError("--adapters_only writes the adapters alone; --hf_out needs the merged model")
    # the attention kernel a run trained with (cuDNN) may not exist here
    model = Kosmos2(Kosmos2Config.from_dict(weights.read_json(paths[1], "the model config")).replace(
        attention_impl="einsum"))
    tokenizer = Kosmos2Tokenizer.from_file(cfg.tokenizer, num_location_tokens=cfg.num_location_tokens)
    checkpoints = Checkpoints(workdir, cfg.train.ckpt_every, cfg.train.keep, async_save=False)
    step = step if step is not None else checkpoints.latest_step()
    if step is None or step not in checkpoints.manager.all_steps():
        raise FileNotFoundError(f"no checkpoint for step {step} in {workdir}/checkpoints "
                                f"(have {sorted(checkpoints.manager.all_steps())})")
    # The run's mesh may need more devices than this machine has: restore onto all of the local
    # ones instead (Orbax reshards), with nothing allocated but the checkpoint itself.
    cfg.unlock()
    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, rules=cfg.mesh.rules))
    init_params = None
    if adapter is not None:  # a LoRA checkpoint holds the adapters: the base is the run's initial weights
        init = cfg.init.hf_dir or cfg.init.checkpoint
        init_params = weights.load_params_for(model.config, init) if init else None
    trainer = Trainer(model, cfg, tokenizer.first_location_id, tokenizer.num_location_tokens,
                      init_params, abstract=adapter is None)
    trainer.restore(checkpoints, step)  # names the step when it is damaged
    checkpoints.close()
    if adapters_only:
        settings = {k: adapter[k] for k in ("rank", "alpha", "targets", "base_dtype")}
        count = weights.save_checkpoint(out, model.config, lora.adapters(trainer.state["params"]), step=step,
                                        extra_json={"lora.json": settings})
        print(f"step {step}: wrote {count:,} adapter parameters (rank {adapter.rank}) to {out}")
        return step
    params = trainer.plain_params()
    count = weights.save_checkpoint(out, model.config, params, step=step)
    print(f"step {step}: wrote {count:,} parameters to {out}" + (" (LoRA adapters merged)" if adapter else ""))
    if hf_out:
        with outputs.atomic_dir(hf_out) as tmp:
            weights.export_hf(tmp, model.config, jax.device_get(params))
        print(f"wrote HF config.json + model.safetensors to {hf_out}")
    return step


def main(argv=None) -> int:
    from kosmos2_jax.utils import cli

    p = cli.ArgumentParser(prog="python -m kosmos2_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, type=cli.existing_dir, help="a kosmos2_jax.train workdir")
    p.add_argument("--step", type=cli.integer(0), default=None, help="the checkpoint's step (default: the latest)")
    p.add_argument("--out", required=True, type=cli.output_dir, help="params checkpoint folder to write")
    p.add_argument("--hf_out", default="", type=cli.output_dir, help="also write HF safetensors here")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out / --hf_out")
    p.add_argument("--adapters_only", action="store_true",
                   help="a LoRA run: write its adapters alone (and lora.json), not the merged model")
    args = p.parse_args(argv)
    return cli.run(lambda: export(args.workdir, args.out, args.step, args.hf_out, args.overwrite,
                                  args.adapters_only) and 0)


if __name__ == "__main__":
    sys.exit(main())
