"""The optimizer catalogue: name → spec (factory, accepted settings, LR behaviour, usual LR range).

Factories come from the libraries the community uses (torch, bitsandbytes, pytorch-optimizer,
prodigyopt, transformers' Adafactor); nothing here reimplements an optimizer. Libraries are imported
lazily, so validating a config that uses `adamw` never imports bitsandbytes.

The settings an optimizer accepts are read from its constructor's signature, so the list a user sees
in an error is exactly what the installed library takes.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Factory = Callable[..., Any]
"""A torch.optim.Optimizer class (torch is imported when a factory loads: `difftune schedule` needs none)."""

# Constructor parameters that are not user settings: the parameters and LR come from difftune
# (train.lr / train.text_encoder_lr); the rest are library plumbing or would make training meaningless.
NOT_SETTINGS = frozenset({
    "self", "params", "lr", "args", "optim_bits", "fsdp_in_use", "capturable", "differentiable", "maximize",
})

# Usual learning rates by optimizer family, from community experience with SD 1.x/2.x/XL:
# (full fine-tune low, high, typical, LoRA low, high, typical). Rough on purpose: doctor only warns
# when an LR is more than 10x outside the range, and the LR finder sweeps that wider interval.
LR_RANGES: dict[str, tuple[float, float, float, float, float, float]] = {
    # Adam-like updates are normalised per element, so the LR is roughly the per-step weight change.
    "adam": (1e-6, 1e-5, 2e-6, 5e-5, 5e-4, 1e-4),
    # Lion's sign update has norm 1 per element: 3-10x smaller LRs than AdamW.
    "lion": (1e-7, 1e-6, 3e-7, 1e-5, 1e-4, 3e-5),
    # Plain SGD steps scale with the (small) gradient itself.
    "sgd": (1e-3, 1e-1, 1e-2, 1e-2, 1.0, 1e-1),
    # Adagrad's accumulated denominator shrinks steps over time: ~10x AdamW.
    "adagrad": (1e-5, 1e-4, 3e-5, 5e-4, 5e-3, 1e-3),
    # LAMB/LARS scale each layer's step by its weight norm (trust ratio): LR is a relative step.
    "lamb": (1e-5, 1e-4, 3e-5, 1e-3, 1e-2, 3e-3),
    "lars": (1e-2, 1e-1, 3e-2, 5e-1, 5.0, 2.0),
    # D-Adaptation and Prodigy estimate the step size; lr multiplies it and stays at 1.0.
    "lr_free": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    # Schedule-free AdamW tolerates (and wants) somewhat larger LRs than AdamW.
    "schedulefree_adam": (2e-6, 2e-5, 5e-6, 1e-4, 1e-3, 3e-4),
}


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer and what to know about it."""

    name: str
    library: str
    load: Callable[[], Factory]  # lazy import of the class (or a small factory around it)
    family: str  # key of LR_RANGES
    summary: str
    defaults: Mapping[str, Any] = field(default_factory=dict)  # difftune defaults that differ from the library's
    aliases: Mapping[str, str] = field(default_factory=dict)  # other tools' setting names → this library's
    lr_free: bool = False  # lr multiplies a step size the optimizer estimates (D-Adapt, Prodigy)
    equal_group_lr: bool = False  # one step size for all groups: unequal group LRs are broken
    per_param_state: bool = False  # all state is per parameter, so a per-parameter step (fused_back_pass) is exact
    schedule_free: bool = False  # keeps train/eval weights apart; needs optimizer.train()/eval()
    lr_ignored: Callable[[Mapping[str, Any]], bool] | None = None  # lr unused for these settings
    ignored: Mapping[str, str] = field(default_factory=dict)  # settings the library takes but ignores → why

    def factory(self) -> Factory:
        return self.load()

    def accepted_settings(self) -> dict[str, Any]:
        """Setting name → library default, read from the constructor signature."""
        return {name: default for name, default, _ in _signature_settings(self.load())}

    def integer_settings(self) -> set[str]:
        """Settings annotated as plain `int` (bitsandbytes leaves floats like momentum=0 unannotated)."""
        return {name for name, _, annotation in _signature_settings(self.load()) if annotation in (int, "int")}

    def settings_with_aliases(self) -> list[str]:
        accepted = self.accepted_settings()
        aliases = {a for a, target in self.aliases.items() if target in accepted}
        return sorted((set(accepted) | aliases) - set(self.ignored))


@cache
def _signature_settings(factory: Factory) -> tuple[tuple[str, Any, Any], ...]:
    """(name, default, annotation) of every user setting of the constructor."""
    target = factory.__init__ if isinstance(factory, type) else factory
    out = []
    for p in inspect.signature(target).parameters.values():
        if p.name in NOT_SETTINGS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out.append((p.name, None if p.default is p.empty else p.default, p.annotation))
    return tuple(out)


# ------------------------------------------------------------------------------------------- loaders
def _torch(cls_name: str) -> Callable[[], Factory]:
    def load() -> Factory:
        import torch

        return getattr(torch.optim, cls_name)

    return load


def _bnb(cls_name: str) -> Callable[[], Factory]:
    def load() -> Factory:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU-kernel notice on import
        import bitsandbytes as bnb

        return getattr(bnb.optim, cls_name)

    return load


def _po(cls_name: str) -> Callable[[], Factory]:
    def load() -> Factory:
        import pytorch_optimizer

        return getattr(pytorch_optimizer, cls_name)

    return load


PRODIGY_AS_RECOMMENDED = {"name": "prodigy", "betas": [0.9, 0.999], "weight_decay": 0.0, "d_coef": 1.0,
                          "use_bias_correction": False, "safeguard_warmup": False}
"""Prodigy as OneTrainer's optimizer guide recommends it to users with no idea of the LR (lr 1): what
`auto.compare_prodigy` and bench/lr_accuracy/alternatives.py compare find-lr with."""


def _prodigy() -> Factory:
    # prodigyopt is the reference implementation kohya, EveryDream2 and OneTrainer users run, with
    # its setting names (use_bias_correction, decouple, safeguard_warmup, d_coef, ...).
    from prodigyopt import Prodigy

    return Prodigy


def _adafactor() -> Factory:
    # transformers' Adafactor is the one kohya and EveryDream2 use: beta1=None (no momentum) and
    # relative_step=True by default, and AdafactorSchedule reports its internal LR.
    from transformers.optimization import Adafactor

    return Adafactor


def _adafactor_lr_ignored(settings: Mapping[str, Any]) -> bool:
    return bool(settings.get("relative_step", True))


# pytorch-optimizer's D-Adapt classes name two settings differently from the `dadaptation` package
# that kohya users configure; accept both spellings.
_DADAPT_ALIASES = {"decouple": "weight_decouple", "use_bias_correction": "bias_correction"}


NESTEROV_8BIT = (
    "bitsandbytes' 8-bit SGD/LARS accept nesterov but run plain momentum; sgdnesterov8bit (kohya's "
    "SGDNesterov8bit) is therefore the same as sgd8bit. Use sgdnesterov for real Nesterov momentum"
)


def _catalogue() -> dict[str, OptimizerSpec]:
    specs: list[OptimizerSpec] = []

    def add(name: str, library: str, load, family: str, summary: str, **kw) -> None:
        specs.append(OptimizerSpec(name, library, load, family, summary, **kw))

    # Standard
    add("adamw", "torch", _torch("AdamW"), "adam", "AdamW (decoupled weight decay); the default", per_param_state=True)
    add("adam", "torch", _torch("Adam"), "adam", "Adam (L2 weight decay)", per_param_state=True)
    add("adagrad", "torch", _torch("Adagrad"), "adagrad", "Adagrad", per_param_state=True)
    add("rmsprop", "torch", _torch("RMSprop"), "adam", "RMSprop (centered = true for the centered variant)",
        per_param_state=True)
    add("sgd", "torch", _torch("SGD"), "sgd", "SGD (momentum, nesterov)", per_param_state=True)
    add("sgdnesterov", "torch", _torch("SGD"), "sgd", "SGD with Nesterov momentum 0.9 (kohya SGDNesterov)",
        defaults={"momentum": 0.9, "nesterov": True}, per_param_state=True)
    add("lamb", "pytorch_optimizer", _po("Lamb"), "lamb", "LAMB (layer-wise trust ratio)")
    add("lars", "pytorch_optimizer", _po("LARS"), "lars", "LARS (layer-wise trust ratio on SGD)")
    add("lion", "pytorch_optimizer", _po("Lion"), "lion", "Lion (sign of momentum)")
    add("adan", "pytorch_optimizer", _po("Adan"), "adam", "Adan (Nesterov-accelerated Adam; three betas)")
    add("came", "pytorch_optimizer", _po("CAME"), "adam", "CAME (confidence-guided Adafactor-like; three betas)")
    # 8-bit and paged (bitsandbytes). bitsandbytes has no momentum-free 8-bit SGD/LARS, hence momentum 0.9;
    # its SGD/LARS kernels take `nesterov` but run plain momentum, so setting it is refused.
    for name, cls, family, extra in [
        ("adamw8bit", "AdamW8bit", "adam", {}),
        ("adam8bit", "Adam8bit", "adam", {}),
        ("lion8bit", "Lion8bit", "lion", {}),
        ("sgd8bit", "SGD8bit", "sgd", {"momentum": 0.9}),
        ("sgdnesterov8bit", "SGD8bit", "sgd", {"momentum": 0.9}),  # kohya's name; see NESTEROV_8BIT
        ("rmsprop8bit", "RMSprop8bit", "adam", {}),
        ("adagrad8bit", "Adagrad8bit", "adagrad", {}),
        ("lamb8bit", "LAMB8bit", "lamb", {}),
        ("lars8bit", "LARS8bit", "sgd", {"momentum": 0.9}),
        ("paged_adamw8bit", "PagedAdamW8bit", "adam", {}),
        ("paged_adam8bit", "PagedAdam8bit", "adam", {}),
        ("paged_lion8bit", "PagedLion8bit", "lion", {}),
        ("paged_adamw", "PagedAdamW", "adam", {}),
        ("paged_adamw32bit", "PagedAdamW32bit", "adam", {}),
        ("paged_adam", "PagedAdam", "adam", {}),
        ("paged_lion", "PagedLion", "lion", {}),
    ]:
        paged = " (paged state: spills to CPU RAM under GPU memory pressure)" if name.startswith("paged") else ""
        ignored = {"nesterov": NESTEROV_8BIT} if cls in ("SGD8bit", "LARS8bit") else {}
        summary = f"bitsandbytes {cls}{paged}" + (" with momentum 0.9 (plain momentum: see nesterov)" if ignored else "")
        add(name, "bitsandbytes", _bnb(cls), family, summary, defaults=extra, per_param_state=True, ignored=ignored)
    # LR-free / adaptive
    for name, cls in [("dadapt_adam", "DAdaptAdam"), ("dadapt_adagrad", "DAdaptAdaGrad"), ("dadapt_adan", "DAdaptAdan"),
                      ("dadapt_lion", "DAdaptLion"), ("dadapt_sgd", "DAdaptSGD")]:
        add(name, "pytorch_optimizer", _po(cls), "lr_free", f"D-Adaptation {cls[6:]} (estimates the step size; lr = 1.0)",
            aliases=_DADAPT_ALIASES, lr_free=True, equal_group_lr=True)
    add("prodigy", "prodigyopt", _prodigy, "lr_free", "Prodigy (estimates the step size; lr = 1.0)",
        lr_free=True, equal_group_lr=True)
    add("adafactor", "transformers", _adafactor, "adam",
        "Adafactor: adaptive (relative_step, scale_parameter, warmup_init; lr ignored) or fixed-LR "
        "(relative_step = false, scale_parameter = false)",
        per_param_state=True, lr_ignored=_adafactor_lr_ignored)
    # Schedule-free
    add("adamw_schedulefree", "pytorch_optimizer", _po("ScheduleFreeAdamW"), "schedulefree_adam",
        "Schedule-free AdamW (use lr_scheduler = constant)", schedule_free=True)
    add("sgd_schedulefree", "pytorch_optimizer", _po("ScheduleFreeSGD"), "sgd",
        "Schedule-free SGD (use lr_scheduler = constant)", schedule_free=True)
    return {s.name: s for s in specs}


OPTIMIZERS: dict[str, OptimizerSpec] = _catalogue()

# Spellings used by other trainers that do not normalise to a catalogue name.
NAME_ALIASES = {
    "dadaptation": "dadapt_adam",  # kohya's "DAdaptation"
    "schedulefreeadamw": "adamw_schedulefree",  # OneTrainer SCHEDULE_FREE_ADAMW
    "schedulefreesgd": "sgd_schedulefree",
}


def _normal(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


_BY_NORMAL = {_normal(n): n for n in OPTIMIZERS} | {_normal(k): v for k, v in NAME_ALIASES.items()}


def canonical_name(name: str) -> str | None:
    """Catalogue name for `name` as kohya / EveryDream2 / OneTrainer spell it (AdamW8bit, DAdaptAdam, ...)."""
    return _BY_NORMAL.get(_normal(name))


def get_spec(name: str) -> OptimizerSpec:
    canon = canonical_name(name)
    if canon is None:
        raise KeyError(name)
    return OPTIMIZERS[canon]


def suggest(name: str) -> str:
    guess = difflib.get_close_matches(_normal(name), list(_BY_NORMAL), n=1)
    return f"; did you mean {_BY_NORMAL[guess[0]]!r}?" if guess else ""


# ----------------------------------------------------------------------------------------- settings
def user_settings(opt_config) -> dict[str, Any]:
    """Settings the user wrote: the typed common ones that are set, plus the extra keys."""
    out = {k: getattr(opt_config, k) for k in ("betas", "eps", "weight_decay") if getattr(opt_config, k) is not None}
    out.update(opt_config.model_extra or {})
    return out


def _check_value(value: Any, default: Any, integer: bool) -> str | None:
    """A type problem with a setting, judged from the library default's type (None: any type)."""
    if default is None or isinstance(default, str):
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"expected true or false (default {default})"
    if integer:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"expected an integer (default {default})"
    if isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"expected a number (default {default})"
    if isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and len(value) == len(default)
        return None if ok else f"expected a list of {len(default)} values (default {list(default)})"
    import torch

    if isinstance(default, torch.dtype):
        return None if isinstance(getattr(torch, str(value), None), torch.dtype) else "expected a dtype name like bfloat16"
    return None


def resolve_settings(spec: OptimizerSpec, settings: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Map aliases, check names and types; returns (keyword arguments, problems)."""
    accepted = spec.accepted_settings()
    kwargs = dict(spec.defaults)
    problems = []
    for key, value in settings.items():
        target = spec.aliases.get(key, key) if spec.aliases.get(key) in accepted else key
        if key == "lr":
            problems.append("optimizer.lr: set the learning rate with train.lr (and train.text_encoder_lr), not in [optimizer]")
            continue
        if target in spec.ignored:
            problems.append(f"optimizer.{key} = {value!r}: refused for {spec.name}: {spec.ignored[target]}")
            continue
        if target not in accepted:
            guess = difflib.get_close_matches(key, spec.settings_with_aliases(), n=1)
            hint = f" Did you mean {guess[0]!r}?" if guess else ""
            problems.append(
                f"optimizer.{key} = {value!r}: {spec.name} ({spec.library}) does not accept {key!r}.{hint} "
                f"Settings {spec.name} accepts: {', '.join(spec.settings_with_aliases()) or '(none)'}"
            )
            continue
        problem = _check_value(value, accepted[target], target in spec.integer_settings())
        if problem:
            problems.append(f"optimizer.{key} = {value!r}: {problem} for {spec.name}")
            continue
        if type(accepted[target]).__name__ == "dtype":  # a torch.dtype (the library, and torch, are loaded)
            import torch

            value = getattr(torch, str(value))
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[target] = value
    return kwargs, problems


def optimizer_kwargs(config) -> dict[str, Any]:
    """Keyword arguments for the factory: difftune defaults, then what the user set (validated at load)."""
    spec = get_spec(config.optimizer.name)
    kwargs, _ = resolve_settings(spec, user_settings(config.optimizer))
    return kwargs


def lr_ignored(config) -> bool:
    """True when the optimizer computes its own LR and train.lr has no effect (adaptive Adafactor)."""
    spec = get_spec(config.optimizer.name)
    return spec.lr_ignored is not None and spec.lr_ignored(optimizer_kwargs(config))


def instantiate(spec: OptimizerSpec, param_groups: list[dict[str, Any]], kwargs: Mapping[str, Any],
                default_lr: float) -> torch.optim.Optimizer:
    """Build the optimizer; each group carries its own `lr`, `default_lr` fills the constructor's."""
    kwargs = {**cuda_kernel_defaults(spec, param_groups, kwargs), **kwargs}
    if spec.lr_ignored is not None and spec.lr_ignored(kwargs):
        kwargs["lr"] = None  # transformers' Adafactor refuses a manual lr with relative_step
    else:
        kwargs["lr"] = default_lr
    optimizer = spec.factory()(param_groups, **kwargs)
    if spec.schedule_free:
        optimizer.train()  # training starts in train mode; the loop switches to eval for validation/saves
    return optimizer


FUSED_ON_CUDA = frozenset({"adamw", "adam", "sgd", "sgdnesterov"})
"""torch optimizers with a fused CUDA kernel: one launch per step instead of one per tensor per operation."""


def cuda_kernel_defaults(spec: OptimizerSpec, param_groups: list[dict[str, Any]],
                         kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`fused = True` when every parameter is a floating-point CUDA tensor and the user chose neither
    `fused` nor `foreach`: the same update as torch's default (foreach) kernels, in fewer launches."""
    if spec.name not in FUSED_ON_CUDA or "fused" in kwargs or "foreach" in kwargs:
        return {}
    params = [p for g in param_groups for p in g["params"]]
    if params and all(p.device.type == "cuda" and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def dry_build_problem(spec: OptimizerSpec, kwargs: Mapping[str, Any], lr: float) -> str | None:
    """Construct the optimizer on a dummy parameter, so a value the library refuses is a config error."""
    import torch

    dummy = torch.nn.Parameter(torch.zeros(4, 4))
    try:
        instantiate(spec, [{"params": [dummy], "lr": lr}], kwargs, lr)
    except (ValueError, TypeError, RuntimeError) as e:
        return f"optimizer.name = {spec.name!r}: {spec.library} refuses these settings ({dict(kwargs)}): {e}"
    return None


# ------------------------------------------------------------------------------------------ LR ranges
LR_KINDS = ("full", "network", "embedding")
EMBEDDING_LR_FACTOR = 10.0
"""Textual-inversion vectors train at about 10x a LoRA's LR (A1111's default 5e-3, diffusers' script 5e-4 x its
batch, for AdamW): a few vectors, each the whole signal of its word."""


def lr_kind(network) -> str:
    """What trains, for the usual LRs: "full" weights (a full fine-tune, LyCORIS native fine-tuning), a
    "network" (the LoRA family, pivotal tuning's LoRA included), or only textual-inversion "embedding" vectors."""
    from difftune.config.network_rules import TEXTUAL_INVERSION

    if network.type == TEXTUAL_INVERSION:
        return "embedding"
    return "full" if network.type in (None, "none", "full") else "network"


def usual_lr_range(optimizer_name: str, kind: str) -> tuple[float, float]:
    """The LR range people usually train with for this optimizer and what trains (lr_kind)."""
    r = LR_RANGES[get_spec(optimizer_name).family]
    if kind == "full":
        return r[0], r[1]
    factor = EMBEDDING_LR_FACTOR if kind == "embedding" else 1.0
    return r[3] * factor, r[4] * factor


def default_lr_range(optimizer_name: str, kind: str) -> tuple[float, float]:
    """Search interval for an LR range test: the usual range widened 10x each way.

    doctor warns when train.lr falls outside this same interval.
    """
    low, high = usual_lr_range(optimizer_name, kind)
    return low / 10, high * 10


def usual_lr(optimizer_name: str, kind: str) -> float:
    """A typical LR for the optimizer and what trains (the start point people use)."""
    r = LR_RANGES[get_spec(optimizer_name).family]
    return r[2] if kind == "full" else r[5] * (EMBEDDING_LR_FACTOR if kind == "embedding" else 1.0)


def lr_ratio_outside(lr: float, low: float, high: float) -> float:
    """How many times lr lies outside [low, high] (1.0 inside)."""
    if lr < low:
        return low / lr
    if lr > high:
        return lr / high
    return 1.0

