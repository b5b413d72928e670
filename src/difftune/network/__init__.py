"""What is trained: the full UNet / text encoder, or a LoRA-family network attached to them."""

from difftune.network.base import TrainableNetwork, build_network

__all__ = ["TrainableNetwork", "build_network"]
