"""kosmos2_jax: KOSMOS-2 (grounded multimodal LLM) in JAX/Flax."""

__version__ = "0.1.0"
