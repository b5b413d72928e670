"""Resumable training state and user-facing exports, written atomically."""
