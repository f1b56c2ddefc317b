"""Training: sharding (mesh + logical axis rules), and later the trainer, checkpoints and optimizers."""
