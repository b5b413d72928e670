"""What every family's single-file loader shares: reading the file safely, the shipped configs,
and the check that every weight was found.

Pickled `.ckpt` files are read with `torch.load(weights_only=True)` only (through diffusers), so a
file that carries code is refused with what to do instead.
"""

from __future__ import annotations

import pickle
from importlib import resources
from pathlib import Path

import torch

from difftune.errors import SingleFileError

READ_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)


def shipped_config_dir(variant: str) -> Path:
    """The diffusers config folder difftune ships for a variant ("sd1", "sd2", "sd2-v", "sdxl", ...)."""
    return Path(str(resources.files("difftune.models") / "configs" / variant))


def read_checkpoint(path: Path) -> dict:
    """Tensors (and `global_step`) of a single file; SingleFileError for unreadable or unsafe files."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except READ_ERRORS as e:
        if _refused_pickle(e):
            raise SingleFileError(
                f"model.path = '{path}': refused as unsafe: this pickled checkpoint holds objects other than "
                "tensors, and unpickling them could run code (difftune reads .ckpt files with "
                "torch.load(weights_only=True) only). Use a .safetensors version of the model; if you trust the "
                "file's source, convert it yourself: python -c \"import torch, safetensors.torch as st; "
                f"sd = torch.load('{path.name}', weights_only=False); sd = sd.get('state_dict', sd); "
                f"st.save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, "
                f"'{path.stem}.safetensors')\""
            ) from None
        raise SingleFileError(f"model.path = '{path}': could not read the checkpoint file: {e}") from e
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor) or k == "global_step"}


def _refused_pickle(error: BaseException | None) -> bool:
    """torch.load(weights_only=True) refused a pickle global (diffusers re-raises it as an OSError)."""
    while error is not None:
        if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def check_fully_loaded(path: Path, modules: dict[str, torch.nn.Module]) -> None:
    """diffusers loads single files non-strictly: weights absent from the file would stay uninitialised."""
    for name, module in modules.items():
        missing = [n for n, p in module.named_parameters() if p.is_meta]
        if missing:
            raise SingleFileError(
                f"model.path = '{path}': the file has no weights for {len(missing)} {name} parameter(s), "
                f"e.g. {', '.join(missing[:3])}; it is incomplete or of another architecture"
            )


def config_dir_for(path: Path, config, default_variant: str, required: tuple[str, ...]) -> Path:
    """model.config_dir when set (checked to hold `required` component configs), else the shipped one."""
    if not config.config_dir:
        return shipped_config_dir(default_variant)
    folder = Path(config.config_dir).expanduser()
    missing = [c for c in required if not (folder / c).is_dir()]
    if missing:
        raise SingleFileError(f"model.config_dir = '{folder}': expected a diffusers config folder with "
                              f"{', '.join(c + '/' for c in required)} configs; missing {', '.join(missing)}")
    return folder
