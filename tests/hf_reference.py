"""Random-init Hugging Face KOSMOS-2 models on CPU (the parity reference) and matching inputs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# (name, vision kwargs, text kwargs, latent queries)
SMALL_CONFIGS = [
    ("tiny", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=7),
     dict(vocab_size=300, embed_dim=64, layers=2, ffn_dim=128, attention_heads=4, max_position_embeddings=256), 8),
    ("odd_heads", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
                       image_size=32, patch_size=8),
     dict(vocab_size=517, embed_dim=96, layers=3, ffn_dim=200, attention_heads=6, max_position_embeddings=256), 4),
    ("deep_narrow", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                         image_size=42, patch_size=14),
     dict(vocab_size=1000, embed_dim=32, layers=4, ffn_dim=48, attention_heads=2, max_position_embeddings=256), 16),
]


def hf_model(vision, text, queries, seed=0):
    """A random HF model in eval mode with every parameter perturbed (so biases, LayerNorm
    weights and the tied head are all exercised, not left at their init values)."""
    torch.manual_seed(seed)
    config = transformers.Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=queries)
    model = transformers.Kosmos2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "latent_query" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def grounded_batch(rng, batch, queries, vocab, image_size, lengths, left_pad_rows=()):
    """Rows `<s> <image> [queries slots] </image> text...` padded with 1 on the right, or on the
    left for `left_pad_rows`; pixel_values NHWC."""
    total = max(lengths)
    ids = np.ones((batch, total), np.int64)
    attn = np.zeros((batch, total), np.int64)
    img_mask = np.zeros((batch, total), np.int64)
    for b, n in enumerate(lengths):
        row = np.concatenate([[0, 5], np.arange(4, 4 + queries), [6], rng.integers(7, vocab, n - queries - 3)])
        start = total - n if b in left_pad_rows else 0
        ids[b, start:start + n] = row
        attn[b, start:start + n] = 1
        img_mask[b, start + 2:start + 2 + queries] = 1
    pixels = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    return pixels, ids, attn, img_mask


def hf_logits(model, pixels, ids, attn, img_mask):
    with torch.no_grad():
        if pixels is None:  # Kosmos2ForConditionalGeneration requires an image; its text model does not
            return model.text_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn)).logits.numpy()
        out = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                    input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn),
                    image_embeds_position_mask=torch.from_numpy(img_mask))
    return out.logits.numpy()


def hf_image_features(model, pixels, interpolate=False):
    with torch.no_grad():
        tokens = model.vision_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                                    interpolate_pos_encoding=interpolate)[0]
        tokens = model.vision_model.model.post_layernorm(tokens)
        tokens = torch.nn.functional.normalize(tokens, dim=-1)
        return model.image_to_text_projection(tokens)[0].numpy()
