"""The grounded text format: tokenizer, processor (image + prompt -> model inputs), grounding
markup, the box rule, the image opener and CLIP normalization, drawing boxes on images."""
