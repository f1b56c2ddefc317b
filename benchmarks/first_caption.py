"""From disk to the first grounded caption: `predict` (cold and warm compilation cache) vs HF, same run.

    .venv/bin/python benchmarks/first_caption.py [--workdir workdir/first_caption] [--repeats 1]

Random-init weights of the released size (HF `Kosmos2Config()`, 1.66B parameters, seed 0), written
once as an HF folder (WORKDIR/hf) and converted once with `convert from-hf` (WORKDIR/ckpt). Then,
each as its own process, on one image with `<grounding>An image of` and 32 new tokens (greedy,
n-gram 3, the released model's settings):
- ours, cold: `python -m kosmos2_jax.predict` with an empty compilation cache;
- ours, warm: the same command again (the cache now holds its programs);
- HF: `Kosmos2ForConditionalGeneration.from_pretrained` + `Kosmos2Processor` + `generate`.
Prints wall time, load time, generate time and peak RSS of each, and the ratios to HF; first, the
time of `checkpoint.restore_params` alone. `predict` reads the weights while it compiles (or loads)
its program, so its "load" column is both; HF's is `from_pretrained`. The weights are read from the
page cache (each folder is read once before timing).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "kosmos2")
PROMPT = "<grounding>An image of"
NEW_TOKENS = 32
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")

# Runs one command and prints its peak RSS: the wrapper's only child is the command.
_MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
            "print('WALL', time.perf_counter() - t, 'PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss"
            " * 1024); sys.exit(r.returncode)")


# `checkpoint.restore_params` alone, as `predict` calls it (decoder one array per layer).
_RESTORE = ("import sys, time; import jax; from kosmos2_jax import weights; t = time.perf_counter(); "
            "_, p = weights.restore_params(sys.argv[1], **weights.DECODING); jax.block_until_ready(p); "
            "t = time.perf_counter() - t; n = sum(x.nbytes for x in jax.tree_util.tree_leaves(p)); "
            "print(f'restore_params: {n / 2**30:.2f} GiB in {t:.2f} s ({n / t / 1e9:.2f} GB/s)')")


def measured(cmd: list[str]) -> tuple[float, float, str]:
    """(wall s, peak RSS bytes, output) of `cmd` as its own process."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=ENV)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    wall, peak = re.findall(r"WALL (\S+) PEAK (\d+)", out.stdout)[-1]
    return float(wall), int(peak), out.stdout


def hf_worker(hf_dir: str, spm: str, image: str) -> None:
    """The HF side, run as its own process by `main`."""
    start = time.perf_counter()
    import torch
    import transformers
    from PIL import Image

    tok = transformers.XLMRobertaTokenizer(spm)
    processor = transformers.Kosmos2Processor(
        transformers.CLIPImageProcessor(size={"height": 224, "width": 224}, do_center_crop=False), tok)
    loading = time.perf_counter()
    model = transformers.Kosmos2ForConditionalGeneration.from_pretrained(hf_dir).eval()
    loaded = time.perf_counter() - loading
    inputs = processor(text=PROMPT, images=Image.open(image).convert("RGB"), return_tensors="pt")
    generating = time.perf_counter()
    with torch.no_grad():
        ids = model.generate(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                             attention_mask=inputs["attention_mask"],
                             image_embeds_position_mask=inputs["image_embeds_position_mask"],
                             max_new_tokens=NEW_TOKENS, no_repeat_ngram_size=3, num_beams=1, do_sample=False)
    generated = time.perf_counter() - generating
    new = ids.shape[1] - inputs["input_ids"].shape[1]
    print(f"HF load {loaded:.2f} generate {generated:.2f} tokens {new} setup {loading - start:.2f}")


def make_weights(workdir: str) -> tuple[str, str]:
    hf_dir, ckpt = os.path.join(workdir, "hf"), os.path.join(workdir, "ckpt")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        import torch
        import transformers

        print(f"writing random-init released-size HF weights to {hf_dir}", flush=True)
        torch.manual_seed(0)
        transformers.Kosmos2ForConditionalGeneration(transformers.Kosmos2Config()).eval().save_pretrained(
            hf_dir, safe_serialization=True)
    if not os.path.isfile(os.path.join(ckpt, "model_config.json")):
        wall, peak, _ = measured([sys.executable, "-m", "kosmos2_jax.convert", "from-hf", "--hf_dir", hf_dir,
                                  "--out", ckpt, "--overwrite"])
        print(f"convert from-hf: {wall:.1f} s, peak RSS {peak / 2**30:.2f} GiB", flush=True)
    return hf_dir, ckpt


def warm_page_cache(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(64 << 20):
                    pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(REPO, "workdir", "first_caption"))
    p.add_argument("--image", default=os.path.join(SHARED, "images", "snowman.png"))
    p.add_argument("--tokenizer", default=os.path.join(SHARED, "sentencepiece.bpe.model"))
    p.add_argument("--repeats", type=int, default=1, help="rounds of (cold, warm, HF); the table shows medians")
    p.add_argument("--hf_worker", nargs=3, metavar=("HF_DIR", "SPM", "IMAGE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_worker:
        return hf_worker(*args.hf_worker)
    for path in (args.image, args.tokenizer):
        if not os.path.isfile(path):
            sys.exit(f"{path} not found (give --image / --tokenizer)")
    hf_dir, ckpt = make_weights(args.workdir)
    warm_page_cache(ckpt)
    wall, peak, out = measured([sys.executable, "-c", _RESTORE, ckpt])
    print(out.strip().splitlines()[0] + f", peak RSS {peak / 2**30:.2f} GiB", flush=True)
    rows = {"ours, cold cache": [], "ours, warm cache": [], "HF transformers": []}
    for _ in range(args.repeats):
        cache = tempfile.mkdtemp(prefix="xla_cache_")
        predict = [sys.executable, "-m", "kosmos2_jax.predict", "--checkpoint", ckpt, "--tokenizer", args.tokenizer,
                   "--image", args.image, "--prompt", PROMPT, "--max_new_tokens", str(NEW_TOKENS),
                   "--compilation_cache", cache]
        warm_page_cache(ckpt)
        for name in ("ours, cold cache", "ours, warm cache"):
            wall, peak, out = measured(predict)
            m = re.search(r"compiled \(or took from the cache\) in (\S+)s; generated \d+ x (\d+) tokens in (\S+)s", out)
            load, tokens, gen = float(m.group(1)), int(m.group(2)), float(m.group(3))
            rows[name].append((wall, load, gen, peak, tokens))
        shutil.rmtree(cache, ignore_errors=True)
        warm_page_cache(hf_dir)
        wall, peak, out = measured([sys.executable, __file__, "--hf_worker", hf_dir, args.tokenizer, args.image])
        m = re.search(r"HF load (\S+) generate (\S+) tokens (\d+)", out)
        rows["HF transformers"].append((wall, float(m.group(1)), float(m.group(2)), peak, int(m.group(3))))
    median = lambda xs: sorted(xs)[len(xs) // 2]
    table = {name: [median([r[i] for r in runs]) for i in range(5)] for name, runs in rows.items()}
    hf_wall = table["HF transformers"][0]
    print(f"\n{NEW_TOKENS} new tokens, {args.repeats} round(s), medians; CPU: {cpu_name()}, {os.cpu_count()} cores")
    print("| run | wall s | load (+ compile) s | generate s | peak RSS GiB | new tokens | wall / HF |")
    print("|---|---|---|---|---|---|---|")
    for name, (wall, load, gen, peak, tokens) in table.items():
        print(f"| {name} | {wall:.1f} | {load:.1f} | {gen:.1f} | {peak / 2**30:.2f} | {tokens} | {wall / hf_wall:.2f} |")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
