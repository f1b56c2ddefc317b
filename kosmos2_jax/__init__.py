"""kosmos2_jax: KOSMOS-2 (grounded multimodal LLM) in JAX/Flax."""

import os as _os

# TensorFlow (tfds / tf.data, the input pipeline) is imported lazily, after this: its oneDNN
# kernels would print a two-line banner in every process and pick CPU-specific code paths (so
# results could differ between machines). Set the variable yourself to keep them.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
