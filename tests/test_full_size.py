"""Full-size (1.66B) checks: slow, run with `make test-slow` (needs ~20 GB RAM and ~14 GB disk)."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_hf_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.Kosmos2ForConditionalGeneration(transformers.Kosmos2Config()).eval()
    d = tmp_path_factory.mktemp("full_hf")
    model.save_pretrained(d, safe_serialization=True)
    del model
    return d


_MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)")


def _peak_rss_of(cmd):
    """Peak resident memory of `cmd` alone (measured by a wrapper process whose only child it is)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return int(out.stdout.split("PEAK")[-1]), out.stdout


def test_conversion_peak_memory(full_hf_dir, tmp_path):
    size = sum(os.path.getsize(full_hf_dir / f) for f in os.listdir(full_hf_dir) if f.endswith(".safetensors"))
    peak, _ = _peak_rss_of([sys.executable, "-m", "kosmos2_jax.convert", "from-hf", "--hf_dir", str(full_hf_dir),
                            "--out", str(tmp_path / "ckpt")])
    print(f"from-hf: checkpoint {size / 2**30:.2f} GiB, peak RSS {peak / 2**30:.2f} GiB ({peak / size:.2f}x)")
    assert peak < 1.5 * size
    peak, _ = _peak_rss_of([sys.executable, "-m", "kosmos2_jax.convert", "to-hf", "--checkpoint", str(tmp_path / "ckpt"),
                            "--out", str(tmp_path / "hf2")])
    print(f"to-hf: peak RSS {peak / 2**30:.2f} GiB ({peak / size:.2f}x)")
    assert peak < 1.5 * size


def test_full_size_forward_equals_hf(full_hf_dir):
    import torch
    import transformers

    from kosmos2_jax import weights

    model, params = weights.load_hf(str(full_hf_dir))
    rng = np.random.default_rng(0)
    ids = np.concatenate([[0, 64003], np.arange(4, 68), [64004], rng.integers(4, 64000, 12)])[None]
    img = np.zeros_like(ids)
    img[0, 2:66] = 1
    pixels = rng.standard_normal((1, 224, 224, 3)).astype(np.float32)
    ours = np.asarray(model.apply({"params": params}, pixels, ids, np.ones_like(ids), img))
    del params
    hf = transformers.Kosmos2ForConditionalGeneration.from_pretrained(full_hf_dir).eval()
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)), input_ids=torch.from_numpy(ids),
                 attention_mask=torch.ones(ids.shape, dtype=torch.long),
                 image_embeds_position_mask=torch.from_numpy(img)).logits.numpy()
    err = np.abs(ours - ref).max()
    assert err <= 1e-4 * max(1.0, np.abs(ref).max()), err
