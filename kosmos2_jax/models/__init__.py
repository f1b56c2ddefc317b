"""Pure-functional Flax Linen modules for KOSMOS-2. Imports nothing from the rest of the package."""

from kosmos2_jax.models.config import Kosmos2Config, TextConfig, VisionConfig, kosmos2_1p6b, tiny
from kosmos2_jax.models.kosmos2 import Kosmos2, init_cache

__all__ = ["Kosmos2", "Kosmos2Config", "TextConfig", "VisionConfig", "init_cache", "kosmos2_1p6b", "tiny"]
