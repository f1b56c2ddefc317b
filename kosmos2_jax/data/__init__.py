"""The input pipeline: tfds records -> grounded token sequences -> batches. Never imports models/ or train/."""
