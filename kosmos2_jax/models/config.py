"""Model configuration: one frozen dataclass per tower, presets for the released model and tests.

Field names follow Hugging Face's `Kosmos2Config` where one exists, so `convert.config_from_hf`
is a plain mapping. `dtype` is the compute dtype ("bfloat16" on accelerators), `param_dtype` the
storage dtype (keep float32 for training).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kosmos2_jax.utils.errors import UsageError

# the common remat policies (layers.remat_policy takes any jax.checkpoint_policies name and
# name-based ones too: "minimal", "minimal_with_context", "save:query_proj+context")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "minimal", "minimal_with_context")
# "einsum": our own softmax(QK^T + bias)V, HF's numerics exactly (the default; the only one with
# attention dropout and cached decoding). "xla" / "cudnn": `jax.nn.dot_product_attention` with that
# implementation for the vision and decoder self-attention in training and scoring forwards;
# "cudnn" is cuDNN's fused flash attention (GPU only, no attention dropout); "splash": Pallas's
# TPU splash attention with segment ids (interpreted elsewhere: slow, for tests).
ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 65037
    max_position_embeddings: int = 2048
    embed_dim: int = 2048
    layers: int = 24
    ffn_dim: int = 8192
    attention_heads: int = 32
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    scale_embedding: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2


@dataclasses.dataclass(frozen=True)
class Kosmos2Config:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    latent_query_num: int = 64
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = True
    # None: as `scan_layers`. False unrolls the decoder alone: on XLA:CPU a scanned layer copies its
    # weights out of the stack on every call, which makes token-by-token decoding 2.4x slower.
    scan_text_layers: bool | None = None
    attention_impl: str = "einsum"
    # Training only: the first N vision layers are frozen (the trainer sets it from train.freeze),
    # so that with scanned layers their backward is not computed at all (layers.stack_layers).
    frozen_vision_layers: int = 0

    def __post_init__(self):
        if self.remat_policy != "none":
            from kosmos2_jax.models.layers import remat_policy

            remat_policy(self.remat_policy)  # raises on an unknown name
        if not 0 <= self.frozen_vision_layers <= self.vision.num_hidden_layers:
            raise UsageError(f"frozen_vision_layers={self.frozen_vision_layers} not in [0, "
                             f"{self.vision.num_hidden_layers}] (the vision layers)")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise UsageError(f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}")
        if self.attention_impl == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise UsageError(f"attention_impl='cudnn' computes in bfloat16 or float16, not dtype={self.dtype!r}")
        for name, width, heads in (("vision", self.vision.hidden_size, self.vision.num_attention_heads),
                                   ("text", self.text.embed_dim, self.text.attention_heads)):
            if width % heads:
                raise UsageError(f"{name} width {width} is not divisible by its {heads} attention heads")
        if self.vision.hidden_act not in ("quick_gelu", "gelu"):
            raise UsageError(f"unsupported vision activation {self.vision.hidden_act!r}")
        if self.text.activation_function not in ("gelu", "gelu_new", "relu"):
            raise UsageError(f"unsupported text activation {self.text.activation_function!r}")

    @property
    def text_layers_scanned(self) -> bool:
        return self.scan_layers if self.scan_text_layers is None else self.scan_text_layers

    def replace(self, **changes: Any) -> "Kosmos2Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Kosmos2Config":
        d = dict(d)
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        return cls(vision=vision, text=text, **d)


def kosmos2_1p6b(**overrides: Any) -> Kosmos2Config:
    """The released model (microsoft/kosmos-2-patch14-224); equals HF's `Kosmos2Config()`."""
    return Kosmos2Config(**overrides)


def tiny(vocab_size: int = 65037, **overrides: Any) -> Kosmos2Config:
    """A few-MB model for tests and the CPU demo."""
    return Kosmos2Config(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28, patch_size=7),
        text=TextConfig(vocab_size=vocab_size, max_position_embeddings=512, embed_dim=64, layers=2, ffn_dim=128,
                        attention_heads=4),
        latent_query_num=8, **overrides)


PRESETS = {"kosmos2_1p6b": kosmos2_1p6b, "tiny": tiny}
