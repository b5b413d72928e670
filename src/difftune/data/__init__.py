"""Image folders → records → deterministic train/validation split → batches."""
