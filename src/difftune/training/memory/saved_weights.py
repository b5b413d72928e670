"""What the autograd graph keeps of frozen weights that are not stored as they are computed with.

An op saves its inputs for backward: a Linear the transposed view of its weight, a conv the weight
Parameter itself. For a layer stored in float8 (precision.py) that input is the compute-dtype copy made
for its forward, and for a swapped block (block_swap.py) the GPU copy: kept by the graph, neither would
be freed before backward, and a saved Parameter would be read as whatever it holds then (float8
again, or a CPU tensor). These saved-tensor hooks store a recipe instead (the Parameter, dtype, device
and view geometry) and rebuild the tensor from the stored weight when backward needs it. Values are
the same: the casts are exact round trips of the stored weight, which is frozen.

Inside a gradient-checkpointed block checkpointing's own hooks are the innermost and take over; it
recomputes the block in backward with the weights brought in again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Recipe:
    param: torch.nn.Parameter
    dtype: torch.dtype
    device: torch.device
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class SavedWeights:
    def __init__(self, params: Iterable[torch.nn.Parameter], source: Callable[[torch.nn.Parameter], torch.Tensor]):
        """`params`: the frozen parameters to save by recipe; `source(param)`: where its stored value is now."""
        self.params = {id(p): p for p in params}
        self.source = source
        self.rebuilt = 0
        """Tensors rebuilt in backward (tests count them)."""
        self._contexts: list = []

    def pack(self, tensor: torch.Tensor):
        base = tensor if isinstance(tensor, torch.nn.Parameter) else tensor._base
        param = self.params.get(id(base)) if base is not None else None
        if param is None or param.storage_offset() != 0 or not param.is_contiguous() \
                or tensor.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
            return tensor
        return _Recipe(param, tensor.dtype, tensor.device, tuple(tensor.size()), tuple(tensor.stride()),
                       tensor.storage_offset())

    def unpack(self, packed):
        if not isinstance(packed, _Recipe):
            return packed
        self.rebuilt += 1
        stored = self.source(packed.param).to(packed.device, non_blocking=True).to(packed.dtype)
        return stored.as_strided(packed.size, packed.stride, packed.offset)

    def install(self, module: torch.nn.Module) -> list:
        """Active for every forward of `module` (under grad); returns the hook handles."""
        return [module.register_forward_pre_hook(self._enter),
                module.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, module, args) -> None:
        context = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        context.__enter__()
        self._contexts.append(context)

    def _exit(self, module, args, output) -> None:
        self._contexts.pop().__exit__(None, None, None)
