"""A researcher forks the train file: a copy of train/loop.py in their own package, a z-loss added
to `loss_fn` in a few lines of plain JAX (no custom gradient), run through `python -m`."""

import os
import re
import shutil
import subprocess
import sys

from conftest import REPO

HERE = os.path.dirname(__file__)

Z_LOSS = '''
    logits_for_z = jnp.einsum("btd,vd->btv", hidden, embedding.astype(hidden.dtype), preferred_element_type=jnp.float32)
    z = jax.nn.logsumexp(logits_for_z, axis=-1) ** 2  # PaLM's z-loss: keep the softmax normalizer near 1
    loss = loss + 1e-2 * jnp.sum(z * mask)
    metrics["z_loss_sum"] = jnp.sum(z * mask)
    return loss, metrics
'''


def test_a_forked_train_file_with_a_z_loss_trains_through_python_m(shapes_tfds, small_spm, tmp_path):
    source = (REPO / "kosmos2_jax" / "train" / "loop.py").read_text()
    end_of_loss = "    return loss, metrics\n"
    assert source.count(end_of_loss) == 1  # the end of loss_fn
    (tmp_path / "myproject").mkdir()
    (tmp_path / "myproject" / "__init__.py").write_text("")
    (tmp_path / "myproject" / "train.py").write_text(source.replace(end_of_loss, Z_LOSS))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-m", "myproject.train",
                          f"--config={HERE}/train_tiny_config.py:{shapes_tfds},{small_spm}",
                          f"--workdir={tmp_path / 'run'}", "--config.train.steps=3"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if re.match(r"step \d+/3 loss", line)]
    assert len(lines) == 3, out.stdout
    z = [float(re.search(r" z_loss (\S+)", line).group(1)) for line in lines]
    assert all(v > 0 for v in z), lines  # logsumexp over a 300-token vocabulary is far from 0
    assert os.path.isfile(tmp_path / "run" / "export" / "model_config.json")
    shutil.rmtree(tmp_path / "run")
