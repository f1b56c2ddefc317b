"""Model FLOPs of a train step (the useful work, counted once) and chips' peak rates: the yardsticks
of `benchmarks/train_mfu.py` (MFU) and `train/compile_check.py` (against XLA's own count)."""

from __future__ import annotations

# dense bf16 peak per chip, TFLOP/s (vendor data sheets; H100/H200 SXM)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5": 459.0}


def peak_tflops(device) -> float | None:
    kind = device.device_kind
    for name, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):  # "TPU v5 lite" before "TPU v5"
        if name in kind:
            return peak
    return None


def forward_flops(config, rows: int, seq_len: int, images: int) -> dict:
    """Matmul FLOPs of one forward without the LM head: {part: flops}; `images` real images in all."""
    v, t, q = config.vision, config.text, config.latent_query_num
    patches = (v.image_size // v.patch_size) ** 2
    n = patches + 1  # + the class token
    dense = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size  # q, k, v, out, fc1, fc2
    vision_attention, decoder_attention = _attention_products(config, rows, seq_len, images)
    vision = images * (2 * patches * v.patch_size ** 2 * v.num_channels * v.hidden_size
                       + v.num_hidden_layers * n * 2 * dense) + vision_attention
    d = t.embed_dim
    resampler = images * (2 * n * v.hidden_size * d  # dense to the text width
                          + 2 * q * d * d * 2  # q_proj and out_proj on the queries
                          + 2 * (n + q) * d * d * 2  # k_proj and v_proj on [tokens; queries]
                          + 2 * 2 * q * (n + q) * d)  # logits and weighted sum
    tokens = rows * seq_len
    decoder = t.layers * tokens * 2 * (4 * d * d + 2 * d * t.ffn_dim) + decoder_attention
    return {"vision": vision, "resampler": resampler, "decoder": decoder}


def _attention_products(config, rows: int, seq_len: int, images: int) -> tuple[float, float]:
    """(vision, decoder) FLOPs of the self-attention products (scores and weighted sum) in one
    forward, every position against every other."""
    v, t = config.vision, config.text
    n = (v.image_size // v.patch_size) ** 2 + 1  # + the class token
    return (images * v.num_hidden_layers * 2 * 2 * n * n * v.hidden_size,
            t.layers * rows * 2 * 2 * seq_len * seq_len * t.embed_dim)


def attention_kernel_flops(config, rows: int, seq_len: int, images: int) -> float:
    """Matmul FLOPs a train step spends inside the towers' attention (scores and weighted sum;
    forward and backward, 3x): what a fused kernel computes, the decoder's causal half only (a
    kernel such as splash skips the blocks above the diagonal)."""
    vision, decoder = _attention_products(config, rows, seq_len, images)
    return 3 * (vision + decoder / 2)


def train_flops(config, rows: int, seq_len: int, images: int, targets: int) -> float:
    """Model FLOPs of one train step: 3x the forward (the backward is twice it), plus the LM head
    on `targets` positions (logits, d hidden, d embedding: 3 matmuls)."""
    head = 3 * targets * 2 * config.text.embed_dim * config.text.vocab_size
    return 3 * sum(forward_flops(config, rows, seq_len, images).values()) + head
