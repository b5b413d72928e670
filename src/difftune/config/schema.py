"""The one typed configuration schema.

Every key is declared once here, with its type, default and a docstring-like description.
Names follow EveryDream2 / kohya where they mean the same thing, so users can carry settings over.
Cross-field rules that need more than one section live in `Config._check_combinations`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    path: str = Field(
        "tiny-sd",
        description="Built-in name (tiny-sd, tiny-sd-v), a diffusers folder (with model_index.json), "
        "or a single .safetensors/.ckpt checkpoint file.",
    )
    family: Literal["auto", "sd1", "sd2", "sd2-v"] = Field(
        "auto", description="Architecture of a single-file checkpoint; auto detects it from the weights."
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="What the UNet predicts; auto reads it from the model's scheduler config."
    )
    config_dir: str | None = Field(
        None, description="Folder of diffusers configs to use for a single-file checkpoint instead of the shipped ones."
    )
    vae_path: str | None = Field(None, description="Optional replacement VAE (diffusers folder or single file).")
    clip_skip: int = Field(1, ge=1, le=12, description="Use the output of the N-th last text encoder layer (kohya clip_skip).")


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


class NetworkConfig(Section):
    type: str | None = Field(None, description="LoRA-family network to train; absent means a full fine-tune.")


class TrainConfig(Section):
    batch_size: int = Field(1, ge=1, description="Images per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-6, gt=0.0, description="Learning rate of the UNet (or the network on it).")
    text_encoder_lr: float | None = Field(None, ge=0.0, description="Learning rate of the text encoder; default: lr.")
    lr_scheduler: str = Field("constant", description="Name of the LR schedule (see `difftune schedule`).")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warmup steps at the start of the schedule.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to train; overrides max_epochs when set.")
    max_epochs: int = Field(1, ge=1, description="Passes over the training images (with repeats).")
    seed: int = Field(555, description="Seed of data order, augmentation and noise.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast precision for forward/backward.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the UNet and text encoder.")
    clip_grad_norm: float | None = Field(None, gt=0.0, description="Clip the global gradient norm to this value.")
    train_unet: bool = Field(True, description="Train the UNet.")
    train_text_encoder: bool = Field(False, description="Train the text encoder.")
    noise_offset: float = Field(0.0, ge=0.0, description="Offset noise strength (0 disables).")
    min_snr_gamma: float | None = Field(None, gt=0.0, description="Min-SNR loss weighting gamma (e.g. 5); off when unset.")


class OptimizerConfig(Section):
    name: str = Field("adamw", description="Optimizer name (see README for the catalogue).")
    weight_decay: float = Field(1e-2, ge=0.0, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam-style beta coefficients.")
    eps: float = Field(1e-8, gt=0.0, description="Numerical stability term.")


class ValidationConfig(Section):
    every_n_steps: int | None = Field(None, ge=1, description="Validate every N optimizer steps.")
    every_n_epochs: int | None = Field(1, ge=1, description="Validate at the end of every N epochs.")
    seed: int = Field(555, description="Seed of the validation split and of its fixed noise and timesteps.")
    batch_size: int | None = Field(None, ge=1, description="Validation batch size; default: train.batch_size.")
    draws_per_image: int = Field(1, ge=1, description="Fixed (noise, timestep) pairs per validation image.")
    stabilize_train_loss: bool = Field(False, description="Also measure the fixed-noise loss on a fixed subset of training images.")
    stabilize_train_count: int = Field(32, ge=1, description="Training images in the stabilized-train-loss subset.")


class SampleConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="Prompts rendered into a sample grid.")
    every_n_steps: int | None = Field(None, ge=1, description="Render samples every N optimizer steps (and at the end).")
    every_n_epochs: int | None = Field(None, ge=1, description="Render samples at the end of every N epochs.")
    seed: int = Field(0, description="Seed of the sample noise, so grids are comparable across steps.")
    steps: int = Field(20, ge=1, description="Sampler steps.")
    cfg_scale: float = Field(7.0, ge=0.0, description="Classifier-free guidance scale.")
    negative_prompt: str = Field("", description="Negative prompt.")
    sampler: Literal["euler", "euler_a", "ddim", "dpmpp_2m", "ddpm"] = Field("euler", description="Sampler.")
    width: int | None = Field(None, ge=8, description="Sample width; default: data.resolution.")
    height: int | None = Field(None, ge=8, description="Sample height; default: data.resolution.")


class OutputConfig(Section):
    dir: str = Field("runs/difftune", description="Run directory.")
    save_every_n_steps: int | None = Field(None, ge=1, description="Save a checkpoint every N optimizer steps.")
    save_every_n_epochs: int | None = Field(None, ge=1, description="Save a checkpoint every N epochs.")
    save_last_n: int | None = Field(None, ge=1, description="Keep only the newest N checkpoints (the final one is always kept).")
    save_state: bool = Field(True, description="Save resumable training state with each checkpoint.")
    save_precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="Precision of exported weights.")
    checkpoint_format: Literal["diffusers", "single_file", "both"] = Field(
        "diffusers",
        description="Full fine-tune exports: a diffusers folder, one original-layout model.safetensors "
        "(what A1111/Forge/ComfyUI load), or both.",
    )
    tensorboard: bool = Field(True, description="Write TensorBoard event files.")
    overwrite: bool = Field(False, description="Allow training into a run directory that already has metrics.")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        if self.data.resolution % 8:
            raise ValueError(f"data.resolution: {self.data.resolution} is not a multiple of 8 (the VAE downsamples by 8)")
        if not (self.train.train_unet or self.train.train_text_encoder):
            raise ValueError("train.train_unet and train.train_text_encoder are both false: nothing would be trained")
        if self.data.keep_tokens and not self.data.shuffle_tags:
            raise ValueError("data.keep_tokens only has an effect with data.shuffle_tags = true")
        return self
