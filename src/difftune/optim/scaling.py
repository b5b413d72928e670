"""LR scaling with the effective batch size (train.scale_lr), and the LRs each parameter group gets.

`sqrt` keeps the gradient-noise scale of Adam-style optimizers roughly constant when the batch grows;
`linear` is the rule for SGD (and what some trainers call "scale_lr"). Both are relative to
`train.scale_lr_base_batch`, the effective batch the configured LR was found at.
"""

from __future__ import annotations

import math

from difftune.config.network_rules import EMBEDDING_ROLE, TEXTUAL_INVERSION


def lr_scale_factor(train) -> float:
    """Multiplier applied to lr, text_encoder_lr (and so lr_min) for the effective batch size."""
    ratio = train.batch_size * train.grad_accum / train.scale_lr_base_batch
    if train.scale_lr == "sqrt":
        return math.sqrt(ratio)
    if train.scale_lr == "linear":
        return ratio
    return 1.0


def effective_lrs(train) -> dict[str, float]:
    """Each role's LR after scaling: the denoiser's `lr`; text_encoder_lr defaults to lr, and
    text_encoder_2_lr to text_encoder_lr (kohya's SDXL scripts use one LR for both encoders)."""
    factor = lr_scale_factor(train)
    te = train.text_encoder_lr if train.text_encoder_lr is not None else train.lr
    te2 = train.text_encoder_2_lr if train.text_encoder_2_lr is not None else te
    embedding = train.embedding_lr if train.embedding_lr is not None else train.lr
    return {"denoiser": train.lr * factor, "text_encoder": te * factor, "text_encoder_2": te2 * factor,
            EMBEDDING_ROLE: embedding * factor}


def with_embedding_role(network, roles: list[str]) -> list[str]:
    """The roles a run trains: textual inversion alone trains its vectors (the "embedding" role) only;
    pivotal tuning trains them beside the LoRA's roles."""
    if network.type == TEXTUAL_INVERSION:
        return [EMBEDDING_ROLE]
    return [*roles, EMBEDDING_ROLE] if network.pivotal else list(roles)


def trains_text(roles) -> bool:
    """Whether gradients flow through the text encoders: one trains, or the token vectors feeding them do."""
    return any(role != "denoiser" for role in roles)


def roles_to_train(train, text_encoder_roles, frozen_roles=(), known: bool = True) -> list[str]:
    """The denoiser (train.train_unet) and those of `text_encoder_roles` train.train_text_encoder selects.

    `frozen_roles` are encoders the family never trains (Flux's and SD3's T5-XXL, as kohya's and
    diffusers' scripts do not): `true` means every other encoder, and naming one is an error, as is
    naming an encoder the model does not have (`known` = False: the model is not known yet)."""
    from difftune.errors import ConfigError

    wanted = train.train_text_encoder if isinstance(train.train_text_encoder, list) else []
    trainable = [r for r in text_encoder_roles if r not in frozen_roles]
    named = [role for role in frozen_roles if role in wanted]
    if named:
        raise ConfigError(f"train.train_text_encoder names {named[0]} (T5-XXL), which difftune does not train; "
                          f"the text encoders this model can train: {', '.join(trainable)}")
    unknown = [role for role in wanted if role not in text_encoder_roles]
    if unknown and known:
        raise ConfigError(f"train.train_text_encoder names {unknown[0]}, which this model does not have; its text "
                          f"encoders: {', '.join(trainable)}")
    roles = ["denoiser"] if train.train_unet else []
    return roles + [role for role in text_encoder_roles if role not in frozen_roles and trains_text_encoder(train, role)]


def trains_text_encoder(train, role: str) -> bool:
    """Whether train.train_text_encoder (true, false or a list of roles) trains `role`."""
    wanted = train.train_text_encoder
    return role in wanted if isinstance(wanted, list) else bool(wanted)
