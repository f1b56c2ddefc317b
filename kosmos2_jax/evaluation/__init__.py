"""Metrics and task evaluators (the paper's protocols, reference §5)."""
