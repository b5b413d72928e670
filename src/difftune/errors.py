"""Every error difftune shows to a user, in one leaf module (it imports nothing of difftune).

The command line prints a `UserError` as one line, `error: <message>`, and exits with 2; the message
names the file, key or value and what would be valid. Modules raise these types and never catch them
to print, so the CLI, the tuners and the web UI report the same words.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; the message says what and how."""


class ConfigError(UserError):
    """A config problem; the message lists every problem found."""


class DatasetError(UserError):
    """The dataset cannot be trained on as it is; the message lists every offending file."""


class ModelLoadError(UserError):
    """The model path or its files are not something difftune can load; the message says why."""


class SingleFileError(ModelLoadError):
    """A single checkpoint file difftune cannot load; the message says why and what to set."""


class LoraFormatError(UserError):
    """A LoRA file or conversion difftune cannot handle; the message says which keys and why."""


class RunLockedError(UserError):
    """Another live process is using the run directory (the message names it and its PID)."""


class CheckpointError(UserError):
    """No save in a run directory can be resumed; the message lists what was found and why each was skipped."""


class DiskFullError(UserError):
    """A write ran out of space; the message names the folder, the space needed and what is still intact."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says at which step and LR (`what`) and what to try."""

    def __init__(self, what: str, advice: str, step: int | None = None):
        super().__init__(f"{what}: {advice}")
        self.what = what
        self.step = step
