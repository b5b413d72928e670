"""One train step, the training loop, and deterministic validation."""
