"""Shared fixtures: the official sentencepiece model (skipped when absent), HF reference objects,
and a small sentencepiece model trained here so that tests never depend on shared/."""

import os
import pathlib
import shutil

import pytest

# The suite runs on the CPU. With libtpu installed (the compile-only check's tests), JAX would
# otherwise probe for a TPU in every process and hold libtpu's lock file.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM's cheapest code generation for XLA:CPU in the tests (this process and every subprocess the
# tests start): the test programs are tiny and compiled once each, so compilation, not running,
# is most of their time (about 30% less for a training test). No fast-math either way, and
# every comparison in the suite runs both sides under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess with `devices` CPU devices (and the suite's fast compilation)."""
    return f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_KOSMOS2 = pathlib.Path(os.environ.get("KOSMOS2_SHARED_DIR", REPO.parent / "shared" / "kosmos2"))
IMAGES_DIR = SHARED_KOSMOS2 / "images"


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """The CLI tests' subprocesses share one persistent XLA compilation cache, so runs of the same
    config (a run and its resume, say) compile once. The same executables, so the same numbers.
    Under xdist both workers use one cache (in the run's common temporary folder)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        cache = tmp_path_factory.getbasetemp().parent / "xla_cache"
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("xla_cache")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
    yield cache


def official_spm_path():
    path = os.environ.get("KOSMOS2_SPM_MODEL") or str(SHARED_KOSMOS2 / "sentencepiece.bpe.model")
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="session")
def spm_path():
    path = official_spm_path()
    if path is None:
        pytest.skip("official sentencepiece.bpe.model not found (set KOSMOS2_SPM_MODEL or provide ../shared/kosmos2/)")
    return path


@pytest.fixture(scope="session")
def tokenizer(spm_path):
    from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer

    return Kosmos2Tokenizer.from_file(spm_path)


@pytest.fixture(scope="session")
def processor(tokenizer):
    from kosmos2_jax.format.processor import Kosmos2Processor

    return Kosmos2Processor(tokenizer)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(spm_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy(spm_path, d / "sentencepiece.bpe.model")
    return d


@pytest.fixture(scope="session")
def hf_processor(hf_tokenizer_dir):
    """HF's Kosmos2Processor over the slow XLM-R tokenizer (the issue's reference)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.XLMRobertaTokenizer.from_pretrained(str(hf_tokenizer_dir))
    image_processor = transformers.CLIPImageProcessor(size={"height": 224, "width": 224}, do_center_crop=False)
    return transformers.Kosmos2Processor(image_processor, tok)


@pytest.fixture(scope="session")
def hf_fast_tokenizer(hf_tokenizer_dir, hf_processor):
    """The fast tokenizer with the processor's added tokens: HF's decoding reference."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.XLMRobertaTokenizerFast.from_pretrained(str(hf_tokenizer_dir), from_slow=True)
    transformers.Kosmos2Processor(hf_processor.image_processor, tok)  # adds the tag/location tokens
    return tok


@pytest.fixture(scope="session")
def small_spm(tmp_path_factory):
    """A 300-piece model trained on synthetic captions with the project's own CLI."""
    from kosmos2_jax.format import tokenizer

    d = tmp_path_factory.mktemp("small_spm")
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star"]
    lines = [f"a {c} {s} to the left of two {c2} {s2}s on a grey background"
             for c in colours for s in shapes for c2 in colours[::-1] for s2 in shapes]
    (d / "captions.txt").write_text("\n".join(lines) + "\n")
    return tokenizer.train_sentencepiece(str(d / "captions.txt"), 300, str(d / "shapes"))


@pytest.fixture(scope="session")
def shapes_tfds(tmp_path_factory):
    """A small prepared shapes dataset (60 train, 10 validation/test) in both configs."""
    from kosmos2_jax.data.build import build

    d = tmp_path_factory.mktemp("shapes_tfds")
    old = {k: os.environ.get(k) for k in ("SHAPES_NUM_TRAIN", "SHAPES_NUM_EVAL")}
    os.environ.update(SHAPES_NUM_TRAIN="60", SHAPES_NUM_EVAL="10")
    try:
        build(str(REPO / "data" / "shapes"), str(d))
        build(str(REPO / "data" / "shapes"), str(d), config="refexp")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return d


def save_tiny_checkpoint(directory, spm_path, num_location_tokens=1024):
    """A random `tiny` model whose vocabulary fits `spm_path` with `num_location_tokens`, saved as
    a params checkpoint."""
    import jax
    import numpy as np

    from kosmos2_jax import weights
    from kosmos2_jax.models import Kosmos2, tiny
    from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer

    vocab = Kosmos2Tokenizer.from_file(spm_path, num_location_tokens=num_location_tokens).vocab_size
    model = Kosmos2(tiny(vocab_size=vocab))
    q = model.config.latent_query_num
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 3), np.float32), np.ones((1, q + 3), np.int32),
                        None, np.pad(np.ones((1, q), np.int32), ((0, 0), (2, 1))))["params"]
    weights.save_checkpoint(directory, model.config, params)
    return str(directory)


# The longest modules first, so the two workers finish together (longest-processing-time
# scheduling). `make test` runs each module on one worker (--dist loadscope, with
# --no-loadscope-reorder: xdist's own reorder puts modules with few tests, such as test_pods.py's
# one 4-minute test, last, where it runs alone). Seconds on the 2-core development VM, for keeping
# the order right: train 330, pods 240, safety 190, evaluate 175, serve 120, grit_engine 100,
# experiments 95, attention_impl 75, compile_check 70, demo 60.
LONGEST_FIRST = ("test_train.py", "test_pods.py", "test_safety.py", "test_evaluate.py", "test_serve.py",
                 "test_grit_engine.py", "test_experiments.py", "test_attention_impl.py", "test_compile_check.py",
                 "test_demo.py", "test_model_parity.py", "test_grit.py", "test_predict.py", "test_sharding.py")


# `make test-unit` (`-m unit`), the fast tier: the format, tiny-config parity with HF, the loss and
# the step, the sharding rules and the layout: 3 min 36 s on 2 cores (2026-12-07).
UNIT_MODULES = ("test_layout.py", "test_tokenizer.py", "test_grounding.py", "test_processor.py", "test_loss.py",
                "test_packing.py", "test_model_cache.py", "test_image_slots.py", "test_schedule.py",
                "test_frozen_layers.py", "test_fork.py", "test_sharding.py", "test_model_parity.py", "test_help.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order
    for item in items:
        if item.path.name in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)


def loss_and_metrics(model, params, batch, rng, deterministic, first_location_id, num_location_tokens,
                     location_weight=1.0, loss_chunk=8, location_kernel=None, num_sources=0, loss_impl="plain"):
    """train/loop.py's `loss_fn` with its settings as arguments (no optimizer in the context)."""
    from kosmos2_jax.train.loop import loss_fn
    from kosmos2_jax.train.trainer import StepContext

    ctx = StepContext(model=model, tx=None, schedule=None, mask=None, seed=0, first_location_id=first_location_id,
                      num_location_tokens=num_location_tokens, location_weight=location_weight,
                      location_kernel=location_kernel, loss_impl=loss_impl, loss_chunk=loss_chunk,
                      grad_accum_steps=1, batch_shards=1, num_sources=num_sources)
    return loss_fn(params, batch, rng, ctx, deterministic)
