"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=N: prints the losses of 3 train steps
on a (data, fsdp, tensor) mesh given as argv[3] ("2,2,2" or "1,1,1") with argv[4] gradient
accumulation steps (default 1) and optimizer argv[5] (default the config's) as JSON, the image slots the vision tower ran on against the
batches' slots (packed rows: their real images are compacted into one block per micro-batch of
each batch shard, train/image_slots.py), and how many all-to-all and collective-permute ops the
compiled step holds. (Several processes: tests/test_pods.py.)"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import jax  # noqa: E402

import train_tiny_config  # noqa: E402
from kosmos2_jax.data.examples import ExampleConfig  # noqa: E402
from kosmos2_jax.data.pipeline import Pipeline, Source  # noqa: E402
from kosmos2_jax.format.processor import Kosmos2Processor  # noqa: E402
from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer  # noqa: E402
from kosmos2_jax.train.trainer import model_config  # noqa: E402
from kosmos2_jax.models import Kosmos2  # noqa: E402
from kosmos2_jax.train.loop import train_step  # noqa: E402
from kosmos2_jax.train.trainer import Trainer  # noqa: E402

data_root, spm, mesh = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = train_tiny_config.get_config(f"{data_root},{spm}")
cfg.train.grad_accum_steps = int(sys.argv[4]) if len(sys.argv) > 4 else 1
if len(sys.argv) > 5:
    cfg.optim.optimizer = sys.argv[5]
cfg.mesh.update(dict(zip(("data", "fsdp", "tensor"), map(int, mesh.split(",")))))
cfg.model.text.dropout = 0.0
tok = Kosmos2Tokenizer.from_file(spm)
model = Kosmos2(model_config(cfg, tok.vocab_size))
proc = Kosmos2Processor(tok, image_size=32, num_image_tokens=8)


def pipeline(batch):
    return Pipeline([Source("s", "grit", data_dir=cfg.data.sources.train.data_dir)], proc, ExampleConfig(seq_len=96), batch, seed=0,
                    num_workers=1, pack=True, pack_max_images=6)


batches = pipeline(8)
trainer = Trainer(model, cfg, tok.first_location_id, train_step=train_step)
losses, slots = [], []
for _ in range(3):
    batch = next(batches)
    m = jax.device_get(trainer.train_step(batch))
    losses.append(float(m["nll_sum"] / m["tokens"]))
    slots.append([trainer.image_slots, batch["pixel_values"].shape[0] * batch["pixel_values"].shape[1]])


def moves(hlo):
    return {op: hlo.count(f" {op}(") for op in ("all-to-all", "collective-permute")}


print("MOVES", json.dumps(moves(trainer.step_hlo(batch))))
if cfg.train.grad_accum_steps > 1:  # the same count for one step on a micro-batch alone
    rows = batch["input_ids"].shape[0] // cfg.train.grad_accum_steps
    cfg.train.update(grad_accum_steps=1, batch_size=rows)
    micro = next(pipeline(rows))
    print("MICRO_MOVES", json.dumps(moves(Trainer(model, cfg, tok.first_location_id, train_step=train_step).step_hlo(micro))))
print("SLOTS", json.dumps(slots))
print("LOSSES", json.dumps(losses))
