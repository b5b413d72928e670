"""Quieting the libraries' chatter (deprecations, optional-kernel notices, their own progress bars)
that would hide difftune's progress and errors.

The CLI asks for it once (`request`); what needs diffusers or transformers imported is applied when a
model family first loads (models/registry.py calls `apply`), so a command that never loads a model
(`--help`, `schedule`) never pays for importing them.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_requested = False


def request() -> None:
    global _requested
    _requested = True
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU-kernel notice on import
    if "diffusers" in sys.modules or "transformers" in sys.modules:
        apply()


def apply() -> None:
    """Turn off diffusers' and transformers' progress bars, if the CLI asked for quiet."""
    if not _requested:
        return
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
