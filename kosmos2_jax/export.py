"""Export the params of a training run's checkpoint (no optimizer state), and optionally HF files.

    python -m kosmos2_jax.export --workdir workdir/shapes_tiny [--step N] --out ckpt/ [--hf_out hf/]

Reads WORKDIR/config.json and WORKDIR/model_config.json (written by `kosmos2_jax.train`) and the
Orbax checkpoint of step N (default: the latest) under WORKDIR/checkpoints. `--out` is a params
checkpoint that `predict`, `evaluate`, `convert to-hf` and `--config.init.checkpoint` read;
`--hf_out` writes config.json + model.safetensors for `Kosmos2ForConditionalGeneration`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def export(workdir: str, out: str, step: int | None = None, hf_out: str = "") -> int:
    import jax
    import ml_collections

    from kosmos2_jax import convert
    from kosmos2_jax.models import Kosmos2, Kosmos2Config
    from kosmos2_jax.tokenizer import Kosmos2Tokenizer
    from kosmos2_jax.train.trainer import Checkpoints, Trainer

    paths = [os.path.join(workdir, n) for n in ("config.json", "model_config.json")]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: is {workdir!r} a kosmos2_jax.train workdir?")
    with open(paths[0]) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    with open(paths[1]) as f:  # the attention kernel a run trained with (cuDNN) may not exist here
        model = Kosmos2(Kosmos2Config.from_dict(json.load(f)).replace(attention_impl="einsum"))
    tokenizer = Kosmos2Tokenizer.from_file(cfg.tokenizer, num_location_tokens=cfg.num_location_tokens)
    checkpoints = Checkpoints(workdir, cfg.train.ckpt_every, cfg.train.keep, async_save=False)
    step = step if step is not None else checkpoints.latest_step()
    if step is None or step not in checkpoints.manager.all_steps():
        raise FileNotFoundError(f"no checkpoint for step {step} in {workdir}/checkpoints "
                                f"(have {sorted(checkpoints.manager.all_steps())})")
    # The run's mesh may need more devices than this machine has: restore onto all of the local
    # ones instead (Orbax reshards), with nothing allocated but the checkpoint itself.
    cfg.unlock()
    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    trainer = Trainer(model, cfg, tokenizer.first_location_id, tokenizer.num_location_tokens, abstract=True)
    state = checkpoints.restore(step, trainer.state)
    checkpoints.close()
    count = convert.save_checkpoint(out, model.config, state["params"])
    print(f"step {step}: wrote {count:,} parameters to {out}")
    if hf_out:
        convert.export_hf(hf_out, model.config, jax.device_get(state["params"]))
        print(f"wrote HF config.json + model.safetensors to {hf_out}")
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kosmos2_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    p.add_argument("--out", required=True, help="params checkpoint folder to write")
    p.add_argument("--hf_out", default="", help="also write HF safetensors here")
    args = p.parse_args(argv)
    try:
        export(args.workdir, args.out, args.step, args.hf_out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
