"""Sampler names users pick (`sample.sampler`, `difftune sample --sampler`) → the diffusers scheduler class.

Pure data, so the config schema and the CLI read the names without importing diffusers.
"""

from __future__ import annotations

SAMPLERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
}


def scheduler_class(name: str):
    import diffusers

    return getattr(diffusers, SAMPLERS[name])
