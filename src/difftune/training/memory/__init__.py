"""Memory settings of a run, decided once from the config: what the trainer keeps where.

- `data.cache_text_embeddings`: text-encoder outputs computed once per caption (data/text_cache.py), the
  frozen encoders then kept on the CPU (`data.offload_encoders`);
- `model.base_precision` / `model.vae_precision`: the dtype frozen weights are stored in; "fp8" stores the
  denoiser's layers in float8 e4m3 and computes each in the autocast dtype (precision.py);
- `train.blocks_to_swap`: transformer blocks kept in CPU memory and brought to the GPU for their
  forward (block_swap.py); the autograd graph reads their weights back through saved_weights.py;
- `train.gradient_checkpointing`: on the denoiser whenever anything trains (gradients flow through it
  even when only a LoRA on it, or only a text encoder, trains).

`memory_plan(config)` checks what can be checked before a model loads (raising ConfigError with the keys
involved) and is what the trainer and doctor both read, so doctor prints what training will do.
"""

from __future__ import annotations

from dataclasses import dataclass

from difftune.config.network_rules import EMBEDDING_ROLE
from difftune.config.schema import Config
from difftune.errors import ConfigError, ModelLoadError

CACHE_BY_DEFAULT = ("flux", "sd3")
"""Families whose text encoders (T5-XXL: 9 GB in bf16) are cached when cache_text_embeddings = auto."""

CPU_BLOCK_SWAP_FOR_TESTS = False
"""Tests set this to run block swap on a CPU-only machine, with a stand-in for the GPU copies
(block_swap.BlockSwap: swapped-out weights become meta tensors, so any use of one fails loudly)."""

HALF = {"bf16", "fp16"}


@dataclass(frozen=True)
class MemoryPlan:
    cache_text: bool
    """Train from cached text-encoder outputs."""
    offload_encoders: bool
    """With the cache: the frozen text encoders live on the CPU between encodings."""
    base_precision: str
    """Storage of the frozen denoiser: "fp32", "bf16", "fp16" or "fp8" (resolved, never "auto")."""
    frozen_precision: str
    """Storage of the other frozen parts (text encoders; the VAE unless vae_precision says otherwise) and of
    the layers fp8 leaves alone (norms, embeddings: diffusers' skip patterns)."""
    compute_precision: str
    """What frozen layers compute in: the autocast dtype, fp32 without mixed precision."""
    vae_precision: str
    """"auto" (frozen_precision, fp32 where the VAE's config asks for it in fp16) or the explicit dtype."""
    blocks_to_swap: int
    gradient_checkpointing: bool
    fully_trained: tuple[str, ...] = ()
    """Roles a full fine-tune trains (their weights are not frozen; a LoRA's base is)."""
    notes: tuple[str, ...] = ()

    @property
    def fp8(self) -> bool:
        return self.base_precision == "fp8"

    def lines(self, total_blocks: int | None = None) -> dict[str, str]:
        """Doctor's memory lines (short: what is cached, the base dtype, blocks swapped)."""
        if self.cache_text:
            where = "encoders on the CPU between encodings" if self.offload_encoders else "encoders stay on the device"
            text = f"cached once per caption ({where})"
        else:
            text = "encoded every step"
        frozen = []
        if "denoiser" not in self.fully_trained:
            frozen.append("denoiser " + (f"fp8 e4m3 storage, {self.compute_precision} compute" if self.fp8
                                         else self.base_precision))
        if not any(role != "denoiser" for role in self.fully_trained):
            frozen.append(f"text encoders {self.frozen_precision}")
        vae = self.vae_precision if self.vae_precision != "auto" else self.frozen_precision
        frozen.append(f"VAE {vae}" + (" (fp32 where its config asks)" if vae == "fp16" and self.vae_precision == "auto"
                                      else ""))
        lines = {"text embeddings": text, "frozen weights": ", ".join(frozen)}
        if self.blocks_to_swap:
            of = f" of {total_blocks}" if total_blocks else ""
            lines["blocks swapped"] = f"{self.blocks_to_swap}{of} transformer blocks kept in CPU memory"
        if self.gradient_checkpointing:
            lines["grad checkpointing"] = "on (the denoiser and any trained text encoder)"
        return lines


def memory_plan(config: Config, cuda: bool, check_device: bool = True) -> MemoryPlan:
    """The run's memory settings with "auto" resolved; ConfigError for combinations that cannot work.

    `cuda`: whether the run has a CUDA device; `check_device` = False skips the checks that need one
    (doctor, which may run on another machine than the training, warns instead)."""
    data, train, model = config.data, config.train, config.model
    trained = _trained_roles(config)
    text_trained = [r for r in trained if r != "denoiser"]
    compute = train.mixed_precision if train.mixed_precision in HALF else "fp32"
    frozen = compute if cuda else "fp32"  # today's rule: the autocast dtype on CUDA, fp32 on the CPU
    notes: list[str] = []

    cache = _resolve_cache(config, text_trained)
    base = model.base_precision
    if base == "auto":
        base = frozen
    elif base in HALF:
        if train.mixed_precision == "no":
            raise ConfigError(f"model.base_precision = '{base}' needs train.mixed_precision = 'bf16' or 'fp16': without "
                              "autocast the fp32 inputs meet half-precision weights; set one, or base_precision = 'auto'")
        frozen = base
    elif base == "fp32":
        frozen = "fp32"
    if base == "fp8":
        _check_fp8(config, trained)
        notes.append(f"model.base_precision = 'fp8' applies to the denoiser only: the text encoders (transformers "
                     f"models) are {'cached' if cache else 'trained' if text_trained else 'kept'} in {frozen}, the VAE "
                     f"in {model.vae_precision if model.vae_precision != 'auto' else frozen}")
    if train.blocks_to_swap:
        _check_swap(config, trained, cuda or not check_device)
    return MemoryPlan(cache_text=cache, offload_encoders=cache and data.offload_encoders, base_precision=base,
                      frozen_precision=frozen, compute_precision=compute, vae_precision=model.vae_precision,
                      blocks_to_swap=train.blocks_to_swap, gradient_checkpointing=train.gradient_checkpointing,
                      fully_trained=tuple(trained) if config.network.type in (None, "none") else (),
                      notes=tuple(notes))


def _trained_roles(config: Config) -> list[str]:
    from difftune.models.registry import trained_roles

    return trained_roles(config)


def _family_name(config: Config) -> str | None:
    from difftune.models.registry import family_for

    try:
        return family_for(config.model).name
    except ModelLoadError:
        return None  # the loader (or doctor) reports the model problem itself


def _resolve_cache(config: Config, text_trained: list[str]) -> bool:
    data = config.data
    wanted = data.cache_text_embeddings
    if wanted == "auto":
        return _family_name(config) in CACHE_BY_DEFAULT and not text_trained and not data.shuffles_tags
    if not wanted:
        return False
    if data.shuffles_tags:
        raise ConfigError("data.cache_text_embeddings = true and data.shuffle_tags = true (or a subset's): shuffled captions differ every "
                          "step, so stored embeddings would train on other text than the step's caption; turn one of "
                          "them off (cache_text_embeddings = 'auto' caches only without shuffle_tags)")
    if EMBEDDING_ROLE in text_trained:
        raise ConfigError("data.cache_text_embeddings = true with textual inversion: the token's vectors change every "
                          "step, and with them the text the encoders give; leave cache_text_embeddings = 'auto'")
    if text_trained:
        raise ConfigError(f"data.cache_text_embeddings = true and train.train_text_encoder trains {', '.join(text_trained)}: "
                          "a trained encoder's outputs change every step, so they cannot be stored; turn one of them "
                          "off (cache_text_embeddings = 'auto' caches only frozen encoders)")
    return True


def _check_fp8(config: Config, trained: list[str]) -> None:
    network = config.network
    if "denoiser" not in trained:
        return  # the denoiser is frozen and nothing is attached to it
    if network.type in (None, "none"):
        raise ConfigError("model.base_precision = 'fp8' with a full fine-tune of the denoiser (network.type is not "
                          "set): fp8 stores frozen weights, and a full fine-tune trains them; set network.type "
                          "(e.g. 'lora'), or model.base_precision = 'bf16'")
    from difftune.network.lycoris_net import NetworkSettings

    settings = NetworkSettings.from_config(network)
    if not settings.bypass:
        what = f"network.type = '{network.type}'" + (" with network.dora = true" if network.dora else "")
        raise ConfigError(f"model.base_precision = 'fp8' and {what}: this algorithm rebuilds each layer's weight from "
                          "the stored base weight, which fp8 storage would corrupt. fp8 works with network.type "
                          "lora, locon, loha or lokr without dora (they add their update to the layer's output); or "
                          "set model.base_precision = 'bf16'")


def _check_swap(config: Config, trained: list[str], cuda: bool) -> None:
    n = config.train.blocks_to_swap
    if not cuda and not CPU_BLOCK_SWAP_FOR_TESTS:
        raise ConfigError(f"train.blocks_to_swap = {n} needs a CUDA GPU (it keeps blocks in CPU memory and moves them "
                          "to the GPU for their forward); on the CPU everything is in CPU memory already: set it to 0")
    if "denoiser" in trained and config.network.type in (None, "none"):
        raise ConfigError(f"train.blocks_to_swap = {n} with a full fine-tune of the denoiser: block swap moves frozen "
                          "base weights, and a full fine-tune trains them (its optimizer state stays on the GPU); "
                          "train a LoRA-family network (network.type), or set blocks_to_swap = 0")
