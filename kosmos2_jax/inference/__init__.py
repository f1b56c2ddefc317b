"""Generation: prefill, cached decoding, sampling."""
