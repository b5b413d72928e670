"""The one typed configuration schema.

Every key is declared once here, with its type, default and a docstring-like description.
Names follow EveryDream2 / kohya where they mean the same thing, so users can carry settings over.
Cross-field rules that need more than one section live in `Config._check_combinations`.
"""

from __future__ import annotations

import math
import os
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from difftune.config import network_rules
from difftune.models.registry import builtin_names, variant_names
from difftune.samplers import SAMPLERS


def _annotation_types(annotation) -> set:
    """The plain types inside an annotation (`int | None` -> {int, NoneType})."""
    args = get_args(annotation)
    if not args:
        return {annotation}
    return set().union(*(_annotation_types(a) for a in args))


def expand_home(path: str | None) -> str | None:
    """`~/data` means the home folder, as in a shell (relative paths are relative to the working directory)."""
    return os.path.expanduser(path) if path else path


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_as_numbers(cls, value, info: ValidationInfo):
        """pydantic would read `true` as 1 for a number; in a config that is always a mistake
        (YAML reads `yes`/`no`/`on` as booleans too)."""
        if isinstance(value, bool):
            kinds = _annotation_types(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


class ModelConfig(Section):
    path: str = Field(
        "tiny-sd",
        description="Built-in name (" + ", ".join(builtin_names()) + "), a diffusers folder (with model_index.json), "
        "or a single .safetensors/.ckpt checkpoint file.",
    )
    family: Literal[("auto", *variant_names())] = Field(
        "auto", description="Architecture of a single-file checkpoint (" + ", ".join(variant_names()) + "); auto "
        "detects it from the weights."
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="What the UNet predicts; auto reads it from the model's scheduler config."
    )
    config_dir: str | None = Field(
        None, description="Folder of diffusers configs to use for a single-file checkpoint instead of the shipped ones."
    )
    vae_path: str | None = Field(None, description="Optional replacement VAE (diffusers folder or single file).")
    clip_skip: int = Field(1, ge=1, le=12, description="Use the output of the N-th last text encoder layer (kohya clip_skip).")
    text_encoder_path: str | None = Field(
        None, description="The first text encoder (Flux/SD3: CLIP-L) as a folder or a single .safetensors, for a "
        "transformer-only checkpoint (a BFL/ComfyUI Flux file).")
    text_encoder_2_path: str | None = Field(
        None, description="The second text encoder (Flux: T5-XXL; SD3: CLIP-G) as a folder or a single .safetensors.")
    text_encoder_3_path: str | None = Field(None, description="SD3's T5-XXL as a folder or a single .safetensors.")
    tokenizer_path: str | None = Field(
        None, description="Folder of the T5 tokenizer (spiece.model or tokenizer.json), needed when the T5 encoder "
        "is given as a single file: it cannot be built offline.")
    use_t5: bool = Field(True, description="SD3/3.5: use the T5-XXL encoder; false trains and samples without it "
                         "(its part of the text embedding is zeros, as diffusers' pipeline does).")
    base_precision: Literal["auto", "fp32", "bf16", "fp16", "fp8"] = Field(
        "auto", description="Storage dtype of the frozen base weights: auto follows train.mixed_precision (fp32 on "
        "the CPU); fp8 stores them as float8 e4m3 and computes each layer in the autocast dtype (kohya fp8_base).")
    vae_precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="VAE dtype: auto = base precision, fp32 where the VAE's config asks (kohya's no_half_vae "
        "is fp32).")


def _leading_dot(value: str) -> str:
    """'txt' and '.txt' both mean the .txt files (kohya writes it with the dot, users often without)."""
    value = value.strip()
    if value.strip(".") == "" or "/" in value or "\\" in value:
        raise ValueError("expected a file extension such as '.txt' or '.caption'")
    return value if value.startswith(".") else "." + value


class SubsetConfig(Section):
    """One `[[data.subsets]]` folder with its own settings; an unset option uses the data.* value."""

    dir: str = Field(description="Folder of images (N_name subfolders and multiply.txt work as in data.train_dir).")
    repeats: float = Field(1.0, gt=0.0, description="Times each image is used per epoch, multiplied with a folder's "
                           "N_ prefix or multiply.txt; a fraction (0.5, 1.5) uses that share of the images each "
                           "epoch, as EveryDream2's multiply.txt.")
    caption_extension: str | None = Field(None, description="Caption extension of this folder; default: data.caption_extension.")
    shuffle_tags: bool | None = Field(None, description="Shuffle this folder's caption tags; default: data.shuffle_tags.")
    keep_tokens: int | None = Field(None, ge=0, description="With shuffle_tags, keep the first N tags; default: data.keep_tokens.")
    flip_p: float | None = Field(None, ge=0.0, le=1.0, description="Horizontal flip probability; default: data.flip_p.")
    cond_dropout: float | None = Field(None, ge=0.0, le=1.0, description="Empty-caption probability; default: data.cond_dropout.")
    is_reg: bool = Field(False, description="Regularisation (prior-preservation) images, as data.reg_dir: never "
                         "validated, balanced against the training images, loss weighted by train.prior_loss_weight.")
    mask_dir: str | None = Field(None, description="Same-name grey masks of this folder's images (mirroring its "
                                 "subfolders), as data.mask_dir for data.train_dir.")

    @field_validator("dir", "mask_dir")
    @classmethod
    def _expand_home(cls, value: str | None) -> str | None:
        return expand_home(value)

    @field_validator("caption_extension")
    @classmethod
    def _leading_dot(cls, value: str | None) -> str | None:
        return None if value is None else _leading_dot(value)

    @model_validator(mode="after")
    def _whole_reg_repeats(self) -> SubsetConfig:
        if self.is_reg and not float(self.repeats).is_integer():
            raise ValueError(f"repeats = {self.repeats:g} with is_reg = true: regularisation images take whole repeats "
                             "(they are balanced against the training images each epoch, the repeats only weight them)")
        return self


class DataConfig(Section):
    train_dir: str | None = Field(None, description="Folder of images with same-name .txt captions; N_name subfolders repeat N times.")
    val_dir: str | None = Field(None, description="Separate validation folder; when set, val_split is ignored.")
    val_split: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of train_dir images held out for validation.")
    resolution: int = Field(512, ge=8, description="Training side length in pixels (images are resized and center-cropped).")
    repeats: int = Field(1, ge=1, description="Repeats for every image, multiplied with a folder's N_ prefix.")
    caption_extension: str = Field(".txt", description="Extension of the caption files next to each image.")
    center_crop: bool = Field(True, description="Center crop after resizing; false crops at a random position.")
    flip_p: float = Field(0.0, ge=0.0, le=1.0, description="Probability of a horizontal flip per sample.")
    cond_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability of training a sample with an empty caption.")
    shuffle_tags: bool = Field(False, description="Shuffle comma-separated tags of a caption every time it is used.")
    keep_tokens: int = Field(0, ge=0, description="With shuffle_tags, keep the first N tags in place.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0 loads in the main process).")
    encode_ahead: bool | Literal["auto"] = Field(
        "auto", description="Encode the next batch's latents (and, with frozen text encoders, its text) in a "
        "background thread while the current step trains: the same numbers, another core. auto: on when "
        "training on the CPU (not yet measured on a GPU).")
    cache_text_embeddings: bool | Literal["auto"] = Field(
        "auto", description="Encode every caption once and train from the stored text embeddings (the text "
        "encoders must be frozen; caption dropout uses a cached empty caption). auto: on for Flux and SD3, whose "
        "T5-XXL is 9 GB in bf16, when nothing forbids it.")
    offload_encoders: bool = Field(True, description="With cached text embeddings, keep the frozen text encoders "
                                   "on the CPU (they come to the device only to encode new text, e.g. samples).")
    reg_dir: str | None = Field(None, description="Regularisation (prior-preservation) images in kohya's N_class "
                                "folders; an image without a caption file takes its folder's class as the caption.")
    subsets: list[SubsetConfig] = Field(default_factory=list, description="More image folders, each with its own "
                                        "repeats and options ([[data.subsets]]); used together with data.train_dir.")
    caption_from_filename: bool = Field(False, description="An image without a caption file takes its file name as "
                                        "the caption (EveryDream2: the name up to the first '_'); false: an error.")
    alpha_mask: bool = Field(False, description="Weight the loss by each image's alpha channel.")
    mask_dir: str | None = Field(None, description="Folder of same-name grey masks of data.train_dir's images "
                                 "(mirroring its subfolders, any image extension); the loss is weighted by them.")
    enable_bucket: bool = Field(True, description="Aspect-ratio buckets (kohya): each image trains at the bucket of "
                                "about resolution² pixels nearest its aspect ratio, each batch from one bucket; "
                                "false: every image is center-cropped to a resolution x resolution square.")
    min_bucket_reso: int | None = Field(None, ge=8, description="Shortest bucket side in pixels; default: "
                                        "resolution / 2 (kohya's 256 at 512).")
    max_bucket_reso: int | None = Field(None, ge=8, description="Longest bucket side in pixels; default: resolution x 2.")
    bucket_reso_steps: int | None = Field(None, ge=8, description="Bucket sides are multiples of this (a multiple of "
                                          "8 that divides resolution); default: 64, or the largest power of two up to "
                                          "64 that divides resolution.")
    bucket_no_upscale: bool = Field(False, description="Never upscale: an image of at most resolution² pixels trains "
                                    "at its own size rounded down to bucket_reso_steps, a larger one scaled down to "
                                    "about resolution² (min/max_bucket_reso do not apply).")
    cache_latents: Literal["off", "memory", "disk"] = Field(
        "off", description="Encode every training image once with the VAE and train from its stored latent "
        "distribution, sampled every step (kohya's cache_latents): memory keeps it for the run, disk in "
        "latent_cache_dir for later runs too (an unchanged image is never encoded again). Needs center_crop = true; "
        "with flip_p > 0 both the image and its mirror are cached. The VAE then waits on the CPU (offload_encoders).")
    vae_batch_size: int = Field(1, ge=1, description="Images per VAE call while caching latents (kohya's "
                                "vae_batch_size; more is faster and takes more device memory).")
    latent_cache_dir: str | None = Field(None, description="Folder of the disk latent cache; default: "
                                         "<output.dir>/latent_cache. Entries are keyed by image content and "
                                         "every setting that changes a latent, so runs may share one folder.")

    @field_validator("train_dir", "val_dir", "reg_dir", "mask_dir")
    @classmethod
    def _expand_home(cls, value: str | None) -> str | None:
        return expand_home(value)

    @field_validator("caption_extension")
    @classmethod
    def _leading_dot(cls, value: str) -> str:
        return _leading_dot(value)

    @model_validator(mode="after")
    def _buckets_fit(self) -> DataConfig:
        """The bucket settings make a bucket list with the resolution x resolution square in it
        (data/buckets.py; a resolution that is not a multiple of 8 is reported by Config)."""
        if self.enable_bucket and self.resolution % 8 == 0:
            from difftune.data.buckets import resolve_data

            resolve_data(self)
        return self

    @model_validator(mode="after")
    def _masks_have_a_folder(self) -> DataConfig:
        if self.mask_dir and not self.train_dir:
            raise ValueError("data.mask_dir holds the masks of data.train_dir's images, and data.train_dir is not set "
                             "(a [[data.subsets]] folder takes its own mask_dir)")
        for i, subset in enumerate(self.subsets):
            shuffles = self.shuffle_tags if subset.shuffle_tags is None else subset.shuffle_tags
            if subset.keep_tokens and not shuffles:
                raise ValueError(f"data.subsets[{i}].keep_tokens only has an effect with shuffle_tags = true "
                                 "(in the subset, or data.shuffle_tags)")
        return self

    @field_validator("latent_cache_dir")
    @classmethod
    def _expand_cache_home(cls, value: str | None) -> str | None:
        return expand_home(value)

    @model_validator(mode="after")
    def _latents_cacheable(self) -> DataConfig:
        """A cached latent is one fixed crop (data/latent_cache.py caches each flip, not each crop)."""
        if self.cache_latents != "off" and not self.center_crop:
            raise ValueError("data.cache_latents needs data.center_crop = true: a random crop changes every epoch, "
                             "so a cached latent would train one crop only; set center_crop = true or "
                             "cache_latents = 'off'")
        if self.latent_cache_dir is not None and self.cache_latents != "disk":
            raise ValueError(f"data.latent_cache_dir is the folder of cache_latents = 'disk' (cache_latents is "
                             f"{self.cache_latents!r}): set cache_latents = 'disk' or remove latent_cache_dir")
        return self

    @property
    def shuffles_tags(self) -> bool:
        """data.shuffle_tags or any subset's own shuffle_tags: some caption changes every time it is used."""
        return self.shuffle_tags or any(s.shuffle_tags for s in self.subsets)


class NetworkConfig(Section):
    """The LoRA family (LyCORIS algorithms); which settings apply to which type: config/network_rules.py."""

    type: str | None = Field(
        None,
        description="LoRA-family network to train: lora, locon, loha, lokr, dylora, ia3, glora, glokr, diag-oft, boft, "
        "full (LyCORIS native fine-tuning); textual_inversion (new token vectors only); absent or 'none' means a "
        "full fine-tune of the model itself.",
    )
    preset: str | None = Field(
        None,
        description="Layers that get the network, by LyCORIS preset name: attn-only, attn-mlp, full-lin, full, ia3; "
        "default: attn-mlp for lora/full, ia3 for ia3, full otherwise.",
    )
    rank: int | None = Field(None, ge=1, description="Rank (kohya network_dim, LyCORIS dim) of linear layers; default 16.")
    alpha: float | None = Field(None, gt=0.0, description="Scale numerator (kohya network_alpha): updates are scaled by alpha/rank; default: rank.")
    conv_rank: int | None = Field(None, ge=1, description="Rank of 3x3 conv layers (LyCORIS conv_dim; preset full); default: rank.")
    conv_alpha: float | None = Field(None, gt=0.0, description="Alpha of 3x3 conv layers; default: alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the network's output (kohya network_dropout).")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Drop whole ranks/rows of the update while training.")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Skip a layer's update entirely with this probability while training.")
    dora: bool = Field(False, description="Weight-decomposed update (DoRA) for lora, locon, loha, lokr.")
    factor: int | None = Field(None, description="LoKr/GLoKr Kronecker factor; -1 (default) picks the most balanced factorisation.")
    block_size: int | None = Field(None, ge=1, description="OFT/BOFT block size, DyLoRA rank step; default 8 (diag-oft), 16 (boft), 4 (dylora).")
    constraint: float | None = Field(None, ge=0.0, description="OFT/BOFT norm constraint (COFT); 0 or unset: unconstrained.")
    rescaled: bool = Field(False, description="OFT/BOFT: learn a per-channel rescale too.")
    init_from: str | None = Field(None, description="Existing LoRA file (kohya or diffusers layout) to continue training from.")
    loraplus_lr_ratio: float | None = Field(None, gt=0.0, description="LoRA+ (kohya's name): the B (lora_up) "
                                            "matrices train at this multiple of the LR (16 is the paper's); lora, locon.")
    loraplus_unet_lr_ratio: float | None = Field(None, gt=0.0, description="LoRA+ ratio of the denoiser's layers "
                                                 "only; default loraplus_lr_ratio.")
    loraplus_text_encoder_lr_ratio: float | None = Field(None, gt=0.0, description="LoRA+ ratio of the text "
                                                         "encoders' layers only; default loraplus_lr_ratio.")
    down_lr_weight: str | list[float] | None = Field(
        None, description="LR multipliers of the UNet's input blocks IN00.. (kohya): a list (12 on SD1/2, 9 on "
        "SDXL; shorter is padded with 1) or a preset sine, cosine, linear, reverse_linear, zeros (+offset).")
    mid_lr_weight: float | None = Field(None, ge=0.0, description="LR multiplier of the UNet's middle block (kohya).")
    up_lr_weight: str | list[float] | None = Field(
        None, description="LR multipliers of the UNet's output blocks OUT00.. (kohya), as down_lr_weight.")
    layer_lr_weights: dict[str, float] | None = Field(
        None, description="LR multipliers by layer name, for every family (Flux and SD3 included): fnmatch patterns "
        "over 'lora_unet_' + the diffusers module path with '_' (lora_te1_... for text encoders), e.g. Flux "
        "{'lora_unet_single_transformer_blocks_*' = 0.5, '*_attn_add_*' = 2.0}; the first "
        "matching pattern applies, times any block weight and LoRA+ ratio; 0 freezes the layer.")
    train_norm: bool = Field(False, description="LyCORIS train_norm: also train the weight and bias of the norm "
                             "layers (LayerNorm, GroupNorm) in the preset's modules; kohya-layout files (w_norm/b_norm).")
    pivotal: bool = Field(False, description="Pivotal tuning: train textual-inversion vectors (network.token, "
                          "init_word, num_vectors) together with this LoRA-family network; the LoRA file carries them "
                          "as kohya's bundle_emb keys, and an embedding file is written next to it.")
    token: str | None = Field(None, description="Textual inversion: the new word it learns, as the captions write it "
                              "(e.g. '<sks>'); it must not be a word of the tokenizer already.")
    init_word: str = Field("*", description="Textual inversion: word(s) whose embeddings the vectors start from "
                           "(vector i starts from token i x tokens / num_vectors, as A1111); default '*' as A1111.")
    num_vectors: int = Field(1, ge=1, le=64, description="Textual inversion: vectors per token (A1111's 'number of "
                             "vectors per token'); token_1 ... token_{n-1} are added as diffusers does.")

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str | None) -> str | None:
        return network_rules.check_type(value)

    @field_validator("token")
    @classmethod
    def _one_word(cls, value: str | None) -> str | None:
        import re

        if value is None:
            return value
        if not re.fullmatch(r"[^\s.,:]+", value):
            raise ValueError("the token must be one word without spaces, dots, commas or colons (e.g. '<sks>'): "
                             "captions write it, A1111 names the bundled embedding by it, and reads <name:...> as "
                             "an extra network")
        if not re.search(r"\w", value):
            raise ValueError("the token needs a letter or digit (e.g. '<sks>'): the embedding file is named by them")
        return value

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None, info: ValidationInfo) -> str | None:
        network_rules.check_preset(value, info.data.get("type"))
        return value

    @field_validator("rank", "alpha", "conv_rank", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
                     "factor", "block_size", "constraint", "rescaled")
    @classmethod
    def _used_by_type(cls, value, info: ValidationInfo):
        """Only explicitly given values are checked (defaults are not validated)."""
        if value in (None, False, 0.0) or "type" not in info.data:  # an invalid type is reported on its own
            return value
        network_type = info.data.get("type")
        network_rules.check_key(info.field_name, value, network_type)
        if info.field_name in ("conv_rank", "conv_alpha"):
            network_rules.check_conv(network_type, info.data.get("preset"))
        if info.field_name == "block_size" and network_type == "dylora":
            rank = info.data.get("rank") or network_rules.DEFAULT_RANK
            if rank % value:
                raise ValueError(f"DyLoRA trains ranks in steps of block_size: network.rank ({rank}) must be a multiple of it")
        return value

    @field_validator("dora")
    @classmethod
    def _dora_supported(cls, value: bool, info: ValidationInfo) -> bool:
        if value:
            network_rules.check_dora(info.data.get("type"), info.data.get("dropout", 0.0))
        return value

    @field_validator("down_lr_weight", "up_lr_weight")
    @classmethod
    def _block_weights(cls, value):
        from difftune.network.lr_weights import check_block_spec

        return check_block_spec(value)

    @field_validator("layer_lr_weights")
    @classmethod
    def _layer_weights(cls, value):
        for pattern, weight in (value or {}).items():
            if weight < 0 or not math.isfinite(weight):
                raise ValueError(f"network.layer_lr_weights[{pattern!r}] = {weight}: a multiplier must be >= 0")
        return value

    @field_validator("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
                     "down_lr_weight", "mid_lr_weight", "up_lr_weight", "layer_lr_weights")
    @classmethod
    def _lr_weights_need_a_network(cls, value, info: ValidationInfo):
        if value is None or "type" not in info.data:
            return value
        network_type = info.data.get("type")
        if network_type in network_rules.FULL_FINETUNE_TYPES or network_type == network_rules.TEXTUAL_INVERSION:
            raise ValueError("LoRA+ and block LR weights apply to a LoRA-family network; set network.type to one "
                             "(textual-inversion vectors have their own LR: train.embedding_lr)")
        from difftune.network.lr_weights import LORA_PLUS_TYPES

        if info.field_name.startswith("loraplus") and network_type not in LORA_PLUS_TYPES:
            raise ValueError(f"LoRA+ scales the B (lora_up) matrices, which network.type = {network_type!r} does not "
                             f"have; it applies to {', '.join(LORA_PLUS_TYPES)}")
        return value

    @field_validator("init_from")
    @classmethod
    def _init_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if info.data.get("type") in network_rules.FULL_FINETUNE_TYPES:
            raise ValueError("network.init_from continues a LoRA-family network or a textual inversion; set "
                             "network.type too")
        from pathlib import Path

        if not Path(value).expanduser().is_file():
            if info.data.get("type") == network_rules.TEXTUAL_INVERSION:
                raise ValueError("file not found (expected an embedding .safetensors: emb_params, clip_l/clip_g)")
            raise ValueError("file not found (expected a LoRA .safetensors in kohya or diffusers layout)")
        return value


class TrainConfig(Section):
    batch_size: int = Field(1, ge=1, description="Images per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-6, gt=0.0, description="Learning rate of the UNet (or the network on it).")
    text_encoder_lr: float | None = Field(None, ge=0.0, description="Learning rate of the (first) text encoder; default: lr.")
    text_encoder_2_lr: float | None = Field(None, ge=0.0, description="Learning rate of the second text encoder "
                                            "(SDXL's OpenCLIP bigG); default: text_encoder_lr.")
    embedding_lr: float | None = Field(None, gt=0.0, description="Learning rate of textual-inversion vectors "
                                       "(network.type = 'textual_inversion' or network.pivotal); default: lr.")
    lr_scheduler: str = Field("constant", description="Name of the LR schedule (see docs/optimizers.md, `difftune schedule`).")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (LR climbs from 0) at the start of the schedule.")
    lr_warmup_ratio: float | None = Field(None, ge=0.0, le=1.0, description="Warmup as a fraction of the run's steps, instead of lr_warmup_steps.")
    lr_decay_steps: int | None = Field(None, ge=1, description="Step where the decay ends (EveryDream2 lr_decay_steps); default: the run length. Cosine climbs back after it.")
    lr_min: float = Field(0.0, ge=0.0, description="LR the schedules decay to (and cyclic's low end); other groups keep the ratio lr_min / lr.")
    lr_cycles: int = Field(1, ge=1, description="Cycles of cosine_with_restarts (and of cyclic when cycle_steps is unset).")
    lr_power: float = Field(1.0, gt=0.0, description="Power of the polynomial schedule.")
    lr_gamma: float | None = Field(None, gt=0.0, le=1.0, description="Per-step factor of exponential / cyclic exp_range; default: reach lr_min (or 1% of lr) at the end of the decay.")
    cycle_steps: int | None = Field(None, ge=2, description="Length of one cyclic cycle (up and down) in steps; default: decay steps / lr_cycles.")
    cyclic_mode: Literal["triangular", "triangular2", "exp_range"] = Field("triangular", description="Shape of the cyclic schedule (torch CyclicLR modes).")
    wsd_decay_ratio: float = Field(0.1, gt=0.0, le=1.0, description="Fraction of the post-warmup steps warmup_stable_decay spends decaying.")
    scale_lr: Literal["none", "sqrt", "linear"] = Field("none", description="Scale lr and text_encoder_lr with the effective batch (batch_size x grad_accum) relative to scale_lr_base_batch.")
    scale_lr_base_batch: int = Field(1, ge=1, description="Effective batch size the configured LRs are meant for (scale_lr).")
    weight_dtype: Literal["fp32", "bf16"] = Field("fp32", description="Storage dtype of the trained weights; bf16 needs mixed_precision bf16 and wants optimizer.stochastic_rounding.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to train; overrides max_epochs when set.")
    max_epochs: int = Field(1, ge=1, description="Passes over the training images (with repeats).")
    seed: int = Field(555, description="Seed of data order, augmentation and noise.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast precision for forward/backward.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the UNet and text encoder.")
    compile: bool = Field(False, description="torch.compile the denoiser (kohya --torch_compile, OneTrainer compile): "
                          "faster steps after compiling at the first step of each bucket shape (a minute or more); "
                          "the same training up to float rounding, so a run keeps the setting it started with.")
    clip_grad_norm: float | None = Field(None, gt=0.0, description="Clip the global gradient norm to this value.")
    train_unet: bool = Field(True, description="Train the denoiser (the UNet).")
    train_text_encoder: bool | list[Literal["text_encoder", "text_encoder_2", "text_encoder_3"]] = Field(
        False, description="Train the text encoder(s): true trains every one the model has, or name them, e.g. "
        "[\"text_encoder\"] to train only SDXL's first (CLIP ViT-L) encoder.")
    noise_offset: float = Field(0.0, ge=0.0, description="Offset noise strength (0 disables); EveryDream2's "
                                "zero_frequency_noise_ratio is read as this.")
    zero_frequency_noise_ratio: float | None = Field(None, ge=0.0, description="EveryDream2's name for "
                                                     "noise_offset (the same offset noise); set one of the two.")
    noise_offset_random_strength: bool = Field(False, description="Draw each step's offset strength uniformly "
                                               "from [0, noise_offset) (kohya).")
    multires_noise_iterations: int = Field(0, ge=0, description="Pyramid (multi-resolution) noise levels added to "
                                           "the noise, kohya's multires_noise_iterations (6-10 typical; 0 disables).")
    multires_noise_discount: float = Field(0.3, gt=0.0, le=1.0, description="Weight of each coarser pyramid level "
                                           "relative to the one before (kohya's default 0.3).")
    input_perturbation: float = Field(0.0, ge=0.0, description="Input perturbation (diffusers' input_perturbation, "
                                      "kohya's ip_noise_gamma): the noisy input gets extra noise of this strength "
                                      "that the target does not (0.1 typical; 0 disables).")
    input_perturbation_random_strength: bool = Field(False, description="Draw each step's perturbation strength "
                                                     "uniformly from [0, input_perturbation) (kohya).")
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = Field(
        "l2", description="Element-wise loss (kohya's names): l2 (MSE), l1, huber (pseudo-Huber with threshold "
        "huber_c: l2 below, l1 above) or smooth_l1 (huber divided by huber_c).")
    huber_c: float = Field(0.1, gt=0.0, description="Huber threshold (kohya's huber_c), shaped over the noise "
                           "levels by huber_schedule.")
    huber_schedule: Literal["constant", "exponential", "snr"] = Field(
        "snr", description="How the Huber threshold varies with the noise level (kohya): constant huber_c, "
        "exponential from 1 at no noise to huber_c at full noise, snr (1 - huber_c) / (1 + noise-to-signal)^2 + huber_c.")
    huber_scale: float = Field(1.0, gt=0.0, description="Multiplier of the constant and exponential thresholds (kohya).")
    min_snr_gamma: float | None = Field(None, gt=0.0, description="Min-SNR loss weighting gamma (e.g. 5); off when unset.")
    debiased_estimation: bool = Field(False, description="Weight the loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), "
                                      "kohya's debiased_estimation_loss; DDPM models.")
    zero_terminal_snr: bool = Field(False, description="Rescale the noise schedule so its last timestep is pure "
                                    "noise (Lin et al. 2023; diffusers' rescale_betas_zero_snr), for v-prediction "
                                    "models; samples and saved folders use the rescaled schedule too.")
    min_timestep: int | None = Field(None, ge=0, description="Lowest training timestep drawn (DDPM models; default 0).")
    max_timestep: int | None = Field(None, ge=1, description="One past the highest training timestep drawn (DDPM "
                                     "models; default the schedule's 1000), as kohya's max_timestep.")
    timestep_sampling: Literal["auto", "uniform", "sigmoid", "logit_normal", "mode", "shift", "flux_shift"] = Field(
        "auto", description="Flow-matching models: how σ is drawn (kohya's names). auto: flux_shift for Flux, "
        "logit_normal for SD3. See docs/flow_matching.md.")
    logit_mean: float = Field(0.0, description="Mean of the normal behind logit_normal sampling.")
    logit_std: float = Field(1.0, gt=0.0, description="Std of the normal behind logit_normal sampling.")
    mode_scale: float = Field(1.29, ge=0.0, lt=1.75, description="Scale of mode sampling (SD3 paper; 0 = uniform).")
    sigmoid_scale: float = Field(1.0, gt=0.0, description="Scale of the normal behind sigmoid, shift and flux_shift.")
    discrete_flow_shift: float | None = Field(
        None, gt=0.0, description="Static shift of σ for timestep_sampling = shift (kohya: 3.0 for SD3, 3.1582 "
        "suggested for Flux); default: the model's scheduler shift.")
    weighting_scheme: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description="Flow-matching loss weighting (diffusers' and kohya's names).")
    guidance_scale: float = Field(1.0, ge=0.0, description="Flux.1-dev: the distilled guidance the transformer is "
                                  "given while training (1.0 as kohya and diffusers train); ignored by schnell.")
    blocks_to_swap: int = Field(0, ge=0, description="Keep this many transformer blocks on the CPU and move each "
                                "in for its forward and backward (kohya/musubi block swap); GPU only.")
    prior_loss_weight: float = Field(1.0, ge=0.0, description="Loss weight of regularisation images (data.reg_dir, "
                                     "is_reg subsets), kohya's prior_loss_weight.")
    lr_from: str | None = Field(
        None,
        description="A find-lr result (find_lr.json): sets lr from its recommendation, or for lr_scheduler = 'cyclic' "
        "lr_min and lr from its lr_min and lr_max. Wins over lr/lr_min written next to it.",
    )

    @model_validator(mode="after")
    def _one_spelling_and_a_timestep_range(self) -> TrainConfig:
        if self.zero_frequency_noise_ratio and self.noise_offset and self.zero_frequency_noise_ratio != self.noise_offset:
            raise ValueError(f"train.zero_frequency_noise_ratio = {self.zero_frequency_noise_ratio} and train.noise_offset "
                             f"= {self.noise_offset}: they are EveryDream2's and kohya's names for the same offset "
                             "noise; set one")
        low, high = self.min_timestep or 0, self.max_timestep
        if high is not None and low >= high:
            raise ValueError(f"train.min_timestep = {low} must be below train.max_timestep = {high} (one past the "
                             "highest timestep drawn)")
        return self


class OptimizerConfig(Section):
    """Common settings are typed here; any other key is passed to the optimizer and checked at load
    against the settings its library accepts (difftune.optim.registry.check_optimizer_config)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())

    name: str = Field("adamw", description="Optimizer name (see docs/optimizers.md; kohya/OneTrainer spellings work).")
    weight_decay: float | None = Field(None, ge=0.0, description="Weight decay; default: the optimizer's own (AdamW: 0.01).")
    betas: tuple[float, ...] | None = Field(None, min_length=2, max_length=3, description="Beta coefficients (three for adan, came); default: the optimizer's own.")
    eps: float | tuple[float, float] | None = Field(None, description="Numerical stability term (a pair for adafactor); default: the optimizer's own.")
    stochastic_rounding: bool = Field(False, description="Round bf16 weight updates stochastically (needs train.weight_dtype = bf16).")
    fused_back_pass: bool = Field(False, description="Step each parameter during backward and free its gradient (saves memory; grad_accum 1, no clip_grad_norm).")


class ValidationConfig(Section):
    every_n_steps: int | None = Field(None, ge=1, description="Validate every N optimizer steps.")
    every_n_epochs: int = Field(1, ge=0, description="Validate at the end of every N epochs; 0: off (every_n_steps only).")
    seed: int = Field(555, description="Seed of the validation split and of its fixed noise and timesteps.")
    batch_size: int | None = Field(None, ge=1, description="Validation batch size; default: train.batch_size.")
    draws_per_image: int = Field(1, ge=1, description="Fixed (noise, timestep) pairs per validation image.")
    stabilize_train_loss: bool = Field(False, description="Also measure the fixed-noise loss on a fixed subset of training images.")
    stabilize_train_count: int = Field(32, ge=1, description="Training images in the stabilized-train-loss subset.")


EMA_USES = ("validation", "samples", "export")


class EMAConfig(Section):
    """An exponential moving average of the trained weights (training/ema.py has the formulas)."""

    enabled: bool = Field(False, description="Keep an EMA of the trained weights (full fine-tune or network).")
    decay: float = Field(0.999, gt=0.0, lt=1.0, description="Per-step decay: the average spans about "
                         "1 / (1 - decay) steps (0.999: 1000). OneTrainer's default; diffusers' scripts use 0.9999.")
    update_every: int = Field(1, ge=1, description="Update the average every N optimizer steps (decay**N each "
                              "time, so the span in steps stays the same; OneTrainer's ema_update_step_interval).")
    warmup: bool = Field(False, description="diffusers EMAModel's use_ema_warmup: the decay ramps up as "
                         "1 - (1 + step / inv_gamma) ** -power, capped at decay; off: decay from the first step.")
    inv_gamma: float = Field(1.0, gt=0.0, description="Warmup's inv_gamma (diffusers' default 1).")
    power: float = Field(2 / 3, gt=0.0, description="Warmup's power (diffusers' default 2/3; 3/4 for short runs).")
    device: Literal["auto", "cpu"] = Field("auto", description="Where the average lives: auto (beside the trained "
                                           "weights) or cpu (off the GPU, at a copy per update).")
    use_for: list[Literal[EMA_USES]] = Field(
        list(EMA_USES), description="What uses the EMA weights: validation (so find-steps picks the step by "
        "them), samples, export (the save's main files; the other weights are written beside them).")


class SampleConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="Prompts rendered into a sample grid.")
    every_n_steps: int | None = Field(None, ge=1, description="Render samples every N optimizer steps (and at the end).")
    every_n_epochs: int | None = Field(None, ge=1, description="Render samples at the end of every N epochs.")
    seed: int = Field(0, description="Seed of the sample noise, so grids are comparable across steps.")
    steps: int = Field(20, ge=1, description="Sampler steps.")
    cfg_scale: float | None = Field(
        None, ge=0.0, description="Classifier-free guidance scale (Flux.1-dev: its distilled guidance); default: the "
        "model's usual value (7.0 for SD/SDXL/SD3, 3.5 for Flux.1-dev, none for schnell).")
    negative_prompt: str = Field("", description="Negative prompt.")
    sampler: Literal[tuple(SAMPLERS)] = Field("euler", description="Sampler: " + ", ".join(SAMPLERS) + ".")
    width: int | None = Field(None, ge=8, description="Sample width; default: data.resolution.")
    height: int | None = Field(None, ge=8, description="Sample height; default: data.resolution.")


class OutputConfig(Section):
    dir: str = Field("runs/difftune", description="Run directory.")

    @field_validator("dir")
    @classmethod
    def _expand_home(cls, value: str) -> str:
        return expand_home(value)
    save_every_n_steps: int | None = Field(None, ge=1, description="Save a checkpoint every N optimizer steps.")
    save_every_n_epochs: int | None = Field(None, ge=1, description="Save a checkpoint every N epochs.")
    save_every_n_minutes: float | None = Field(None, gt=0.0, description="Save a checkpoint when this many minutes "
                                               "have passed since the last save (EveryDream2's save_every_n_minutes).")
    save_from_epoch: int = Field(0, ge=0, description="No periodic save before this many epochs are complete "
                                 "(EveryDream2's save_ckpts_from_n_epochs); the final save always happens.")
    log_every_n_steps: int = Field(1, ge=1, description="Write a metrics record (metrics.jsonl, TensorBoard) every N "
                                   "steps, its loss the mean since the last record (EveryDream2's log_step); steps "
                                   "that validate, sample or save always write one.")
    save_last_n: int | None = Field(None, ge=1, description="Keep only the newest N checkpoints (the final one is always kept).")
    save_state: bool = Field(True, description="Save resumable training state with each checkpoint.")
    save_precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="Precision of exported weights.")
    checkpoint_format: Literal["diffusers", "single_file", "both"] = Field(
        "diffusers",
        description="Full fine-tune exports: a diffusers folder, one original-layout model.safetensors "
        "(what A1111/Forge/ComfyUI load), or both.",
    )
    lora_format: Literal["kohya", "diffusers", "both"] = Field(
        "kohya",
        description="LoRA-family exports: kohya/LyCORIS layout (ComfyUI, A1111/Forge, kohya), diffusers/PEFT layout "
        "(pipeline.load_lora_weights), or both.",
    )
    tensorboard: bool = Field(True, description="Write TensorBoard event files.")
    wandb: bool = Field(False, description="Log to Weights & Biases too (optional: pip install 'difftune[wandb]'; "
                        "WANDB_MODE=offline keeps it on disk).")
    wandb_project: str | None = Field(None, description="W&B project; default 'difftune'.")
    wandb_run_name: str | None = Field(None, description="W&B run name; default the run directory's name.")
    overwrite: bool = Field(False, description="Allow training into a run directory that already has metrics.")
    save_best: bool = Field(False, description="Keep an export of the weights with the lowest validation loss in checkpoints/best.")


class FindLRConfig(Section):
    """`difftune find-lr`: an LR range test on the configured setup (docs/tuning.md)."""

    start_lr: float | None = Field(None, gt=0.0, description="Lowest LR of the sweep; default: per optimizer and full vs LoRA.")
    end_lr: float | None = Field(None, gt=0.0, description="Highest LR of the sweep; default: per optimizer and full vs LoRA.")
    shape: Literal["log", "linear"] = Field(
        "log", description="log: log-spaced stairs (equal resolution per decade); linear: the community's linear ramp."
    )
    num_points: int = Field(24, ge=5, description="Probe evaluations along the ramp.")
    steps_per_point: int = Field(5, ge=1, description="Optimizer steps between two probe evaluations.")
    extend: bool = Field(True, description="Keep sweeping past end_lr (up to 100x) until the loss diverges (log shape).")
    rule: Literal["default", "valley", "steepest", "midpoint", "min_div10"] = Field(
        "default", description="How the recommended LR is read from the curve (docs/tuning.md compares them)."
    )
    probe: Literal["val", "train", "both"] = Field(
        "val", description="Probe items: held-out images, a fixed subset of training images, or both pooled."
    )
    probe_items: int = Field(64, ge=4, description="At least this many fixed (image, noise, timestep) probe items: "
                             "draws per image are raised to reach it.")
    smoothing: float = Field(1.0, ge=0.0, description="Width (in points) of the Gaussian smoothing of the curve.")
    bootstrap_samples: int = Field(200, ge=0, description="Resamples of the probe items for the LR band (0: no band).")
    stop_factor: float = Field(4.0, gt=1.0, description="Stop the sweep once the loss exceeds this multiple of its best.")
    edge_divisor: float = Field(4.5, gt=1.0, description="The default rule trains this factor below the LR where the "
                                "sweep diverged (measured in bench/lr_accuracy); raise it for a more cautious LR.")
    group: Literal["all", "denoiser", "text_encoder", "text_encoder_2", "embedding"] = Field(
        "all", description="Whose LR the sweep ramps: all groups at their configured ratios, or one role's (the "
        "others stay at their configured LRs, e.g. the UNet's at its found value, to find train.text_encoder_lr; "
        "embedding: pivotal tuning's vectors, train.embedding_lr).")

    @model_validator(mode="after")
    def _range_increases(self) -> FindLRConfig:
        if self.start_lr is not None and self.end_lr is not None and self.start_lr >= self.end_lr:
            raise ValueError(f"find_lr.start_lr ({self.start_lr:g}) must be below find_lr.end_lr ({self.end_lr:g})")
        return self


class FindStepsConfig(Section):
    """`difftune find-steps`: train at a constant LR and stop where the validation loss bottoms out."""

    max_steps: int | None = Field(None, ge=1, description="Most steps to train; default: the configured run length.")
    every_n_steps: int | None = Field(None, ge=1, description="Validate every N steps; default: 1/25 of max_steps.")
    patience: int = Field(8, ge=0, description="Stop after N validations without a new best; 0: off "
                          "(8: measured by bench/stopping_rules.py).")
    gl_alpha: float = Field(0.0, ge=0.0, description="Also stop when the validation loss is this many percent above "
                            "its best (Prechelt's GL_alpha); 0 (default): off, it stops noisy curves too early.")
    gl_consecutive: int = Field(2, ge=1, description="Validations in a row above gl_alpha needed to stop (1: the "
                                "first one, Prechelt's rule as published; 2 rides out a single bump).")
    min_delta: float = Field(0.0, ge=0.0, description="Relative improvement that counts as a new best for patience.")
    margin: float = Field(0.01, ge=0.0, description="Steps whose validation loss is within this fraction of the best "
                          "form the reported step band.")


class AutoConfig(Section):
    """`difftune auto`: find-lr, then find-steps at its LR, then the final model and report.html."""

    final_run: Literal["reuse", "retrain"] = Field(
        "reuse",
        description="reuse: the final model is find-steps' best checkpoint (training is deterministic, so a rerun to "
        "that step gives the same weights); retrain: train again at the chosen LR and steps into <output.dir>/final.",
    )
    add_validation_back: bool = Field(
        False,
        description="Retrain the final model with the validation images added back (same number of epochs). Nothing "
        "then measures that run: it trains blind.",
    )
    sweep_text_encoder: bool = Field(
        True, description="When a text encoder trains: after the first sweep, sweep each text encoder's LR with the "
        "UNet's held at its found value (find_lr.group), instead of keeping the configured ratio.")
    compare_prodigy: bool = Field(
        False, description="Also train Prodigy (lr 1, OneTrainer's recommended settings) for find-steps' budget, with "
        "the same seed, data and validation, into <output.dir>/compare-prodigy, and show both in report.html: what "
        "the LR search bought on this setup (one more training run).")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    find_lr: FindLRConfig = Field(default_factory=FindLRConfig)
    find_steps: FindStepsConfig = Field(default_factory=FindStepsConfig)
    auto: AutoConfig = Field(default_factory=AutoConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        if self.data.resolution % 8:
            raise ValueError(f"data.resolution: {self.data.resolution} is not a multiple of 8 (the VAE downsamples by 8)")
        if self.train.train_text_encoder == []:
            raise ValueError("train.train_text_encoder = []: name at least one text encoder, or set it to false")
        if not (self.train.train_unet or self.train.train_text_encoder):
            raise ValueError("train.train_unet and train.train_text_encoder are both false: nothing would be trained")
        if self.data.keep_tokens and not self.data.shuffle_tags:
            raise ValueError("data.keep_tokens only has an effect with data.shuffle_tags = true")
        if problem := network_rules.check_lora_format(self.output.lora_format, self.network.type, self.network.dora):
            raise ValueError(problem)
        if problem := network_rules.check_textual_inversion(self.network):
            raise ValueError(problem)
        if self.train.embedding_lr is not None and not (self.network.pivotal
                                                        or self.network.type == network_rules.TEXTUAL_INVERSION):
            raise ValueError("train.embedding_lr is the LR of textual-inversion vectors, which this run does not train "
                             "(set network.type = 'textual_inversion', or network.pivotal = true)")
        if self.network.type == network_rules.TEXTUAL_INVERSION and self.train.train_text_encoder:
            raise ValueError("train.train_text_encoder with network.type = 'textual_inversion': it trains the token's "
                             "vectors only; for a LoRA on the text encoder too, set network.type = 'lora' and "
                             "network.pivotal = true")
        if self.network.train_norm and self.network.type == network_rules.TEXTUAL_INVERSION:
            raise ValueError("network.train_norm trains norm layers of a LoRA-family network; textual inversion "
                             "trains token vectors only (network.pivotal = true with a LoRA type trains both)")
        if self.network.train_norm and self.network.type in (None, "none"):
            raise ValueError("network.train_norm applies to a LoRA-family network (a full fine-tune trains the norm "
                             "layers already); set network.type")
        if self.network.train_norm and self.output.lora_format != "kohya":
            raise ValueError(f"network.train_norm with output.lora_format = '{self.output.lora_format}': the diffusers/"
                             "PEFT layout has no place for norm weights; use output.lora_format = 'kohya'")
        return self
