"""Block swap (train.blocks_to_swap): the last N transformer blocks live in CPU memory and come to the
GPU for their forward, as kohya's and musubi-tuner's block swap do for cards with little memory.

What moves: only the blocks' frozen base weights. A LoRA-family network's modules are not submodules of
the blocks (LyCORIS patches each layer's forward and keeps its parameters in the network), so the
trained parameters and their optimizer state stay on the GPU. Frozen weights never change, so each has
one pinned CPU copy made at start: bringing a block in is one host-to-device copy per weight, sending
it out drops the GPU copy (nothing is copied back).

Backward without gradient checkpointing: the graph would keep each block's GPU weights alive until
backward (and an op that saved a weight Parameter itself, as a norm's multiply does, would find the CPU
copy there by then); saved_weights.SavedWeights stores a recipe instead and rebuilds each weight from
the CPU copy when backward reaches it, so the GPU copy is freed when the block's forward ends.

With gradient checkpointing, backward runs each block's forward again (`checkpoint_function`, given to
diffusers' enable_gradient_checkpointing) and that recomputation saves the Parameters themselves: so
a block recomputed in backward stays on the GPU until the next block's recomputation begins (autograd
runs every node of a later block before any node of an earlier one) or backward ends.

For tests on a CPU-only machine (`memory.CPU_BLOCK_SWAP_FOR_TESTS`), `stand_in` makes the "GPU copy" a
clone and a swapped-out weight an empty tensor: any use of a weight that is not in fails loudly.
"""

from __future__ import annotations

import contextlib

import torch

from difftune.errors import ConfigError
from difftune.training.memory.precision import FP8


class BlockSwap:
    def __init__(self, blocks: list[torch.nn.Module], device: torch.device, stand_in: bool = False):
        self.blocks = blocks
        self.device = torch.device(device)
        self.stand_in = stand_in
        self.host: dict[int, torch.Tensor] = {}
        """id(parameter) → its CPU copy."""
        self._block_of: dict[int, int] = {}
        self.params: list[list[torch.nn.Parameter]] = []
        self.resident: set[int] = set()
        """Indices (into `blocks`) of the blocks whose weights are on the device now."""
        self._recomputing = 0
        self._cleanup_queued = False
        self.trace: list[tuple[int, str]] | None = None
        """Set to a list to record (block index, "in" | "out") events (tests)."""
        self._handles: list = []

    @classmethod
    def for_model(cls, model, count: int, device: torch.device, stand_in: bool = False) -> BlockSwap:
        """The last `count` of the model's transformer blocks; ConfigError for a model without blocks."""
        if not hasattr(model, "denoiser_blocks"):
            raise ConfigError(f"train.blocks_to_swap = {count}: blocks_to_swap is for the transformer families (Flux, "
                              f"SD3); {model.family}'s UNet has no block sequence to swap; set it to 0")
        blocks = list(model.denoiser_blocks())
        if count >= len(blocks):
            raise ConfigError(f"train.blocks_to_swap = {count}: the model has {len(blocks)} transformer blocks, and at "
                              f"least one stays on the GPU: use at most {len(blocks) - 1}")
        return cls(blocks[len(blocks) - count:], device, stand_in)

    @property
    def param_ids(self) -> frozenset[int]:
        return frozenset(self.host)

    def swapped_params(self) -> list[torch.nn.Parameter]:
        return [p for params in self.params for p in params]

    def prepare(self, dtype: torch.dtype) -> None:
        """Move the blocks' frozen weights to CPU memory (in `dtype`; float8 stays float8) and install the
        hooks. Call before the rest of the model goes to the device, so the blocks never all sit there."""
        pin = self.device.type == "cuda" and not self.stand_in
        for index, block in enumerate(self.blocks):
            params = [p for p in block.parameters() if not p.requires_grad]
            for p in params:
                host = p.data.to("cpu", dtype) if p.is_floating_point() and p.dtype != FP8 else p.data.to("cpu")
                if pin:
                    try:
                        host = host.pin_memory()  # async copies; falls back to pageable memory where pinning fails
                    except RuntimeError:
                        pass
                self.host[id(p)] = host
                self._block_of[id(p)] = index
                p.data = self._placeholder(host)
            self.params.append(params)
            self._handles += [block.register_forward_pre_hook(self._pre_hook(index)),
                              block.register_forward_hook(self._post_hook(index), always_call=True)]

    def source(self, param: torch.nn.Parameter) -> torch.Tensor:
        """Where a weight's value is now (saved_weights reads it in backward): the CPU copy when out."""
        index = self._block_of.get(id(param))
        return self.host[id(param)] if index is not None and index not in self.resident else param.data

    def bring_in(self, index: int) -> None:
        if index in self.resident:
            return
        for p in self.params[index]:
            host = self.host[id(p)]
            p.data = host.clone() if self.stand_in else host.to(self.device, non_blocking=True)
        self.resident.add(index)
        if self.trace is not None:
            self.trace.append((index, "in"))

    def send_out(self, index: int) -> None:
        if index not in self.resident:
            return
        for p in self.params[index]:
            p.data = self._placeholder(self.host[id(p)])
        self.resident.discard(index)
        if self.trace is not None:
            self.trace.append((index, "out"))

    def send_all_out(self) -> None:
        for index in sorted(self.resident):
            self.send_out(index)

    def checkpoint_function(self, block: torch.nn.Module, *args):
        """What diffusers calls to checkpoint a block: torch's non-reentrant checkpoint, with the
        recomputation marked so the block's weights stay in for its backward."""
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block.__call__, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), self._recomputation()))

    @contextlib.contextmanager
    def _recomputation(self):
        self._recomputing += 1
        try:
            yield
        finally:
            self._recomputing -= 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _placeholder(self, host: torch.Tensor) -> torch.Tensor:
        # On the GPU path the swapped-out Parameter holds its CPU copy, so inspecting it (state_dict, a
        # pipeline asking for devices) still works; the stand-in holds no values at all.
        return torch.empty(0, dtype=host.dtype) if self.stand_in else host

    def _pre_hook(self, index: int):
        def hook(module, args):
            if self._recomputing:  # backward has moved on to this (earlier) block: the later one is done
                for other in sorted(self.resident - {index}):
                    self.send_out(other)
            self.bring_in(index)
        return hook

    def _post_hook(self, index: int):
        def hook(module, args, output):
            if not self._recomputing:
                self.send_out(index)
            elif not self._cleanup_queued:
                # the last block recomputed goes out when this backward ends
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                self._cleanup_queued = True
        return hook

    def _end_of_backward(self) -> None:
        self._cleanup_queued = False
        self.send_all_out()
