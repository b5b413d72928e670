"""LR-finder accuracy benchmark: `python -m bench.lr_accuracy` (see run.py)."""
