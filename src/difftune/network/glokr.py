"""GLoKr: GLoRA's update with LoKr's Kronecker-factored matrices, as a LyCORIS module.

GLoRA (generalised LoRA) changes a layer's weight W (out x in, times the kernel for a convolution) to

    W' = W + W·A + B

with a low-rank A (in x in, acting on the layer's input channels) and a low-rank B (W's shape). GLoKr
keeps that form and writes each of the two matrices as a Kronecker product, as LoKr does:

    ΔW = (alpha / rank) · (W·kron(a_w1, a_w2) + kron(b_w1, b_w2))

- in = in_m·in_n and out = out_l·out_k come from LyCORIS's `factorization()` with `network.factor`
  (-1: the most balanced split, the smaller part first), exactly as LoKr splits its layers;
- a_w1 is in_m x in_m, a_w2 in_n x in_n; b_w1 is out_l x in_m, b_w2 out_k x in_n (x the kernel: a 3x3
  convolution's window lives in b_w2 only; A is 1x1, it mixes input channels);
- the larger factor w2 of each half is itself low-rank, w2 = w2_a @ w2_b with inner size `rank`, when
  `rank` is below half of its larger side (LoKr's rule); otherwise it is a full matrix;
- alpha / rank scales the whole update, for every layer (LoKr drops alpha when both of its factors are
  full; GLoKr does not, so `network.alpha` always means the same thing);
- at step 0 the update is exactly zero: the w1 factors and w2_a start random (Kaiming, as LoRA's down),
  w2_b (or a full w2) starts at zero, as LoRA's up and GLoRA's a2/b2 do.

State-dict keys (per layer, in the kohya layout `lora_unet_<path>.<key>`): `glokr_a_w1`, `glokr_a_w2`
or `glokr_a_w2_a` + `glokr_a_w2_b`, `glokr_b_w1`, `glokr_b_w2` or `glokr_b_w2_a` + `glokr_b_w2_b`
(b_w2_b is rank x in_n x kernel), and `alpha`.

Why it is written here: no maintained library implements GLoKr (LyCORIS 4.1.3 has GLoRA and LoKr, not
their combination), so this module subclasses LyCORIS's module base and registers itself in the table
LyCORIS's kohya front end builds modules from (`lycoris.wrapper.network_module_dict`), and difftune
builds, trains, saves, reloads and merges it like LyCORIS's own algorithms.

Its files load in difftune only: ComfyUI, A1111/Forge and LyCORIS itself do not know the glokr_*
tensors, so a UI cannot load the file unmerged. Bake it into a checkpoint with `difftune merge BASE
FILE OUT` and load that.
"""

from __future__ import annotations

import inspect
import math
from importlib import metadata

import torch
import torch.nn as nn
from lycoris.functional import factorization
from lycoris.modules.base import LycorisBaseModule

ALGO = "glokr"
WRITTEN_FOR_LYCORIS = "4.1.3"
"""The LyCORIS release this module was written and tested against: its LycorisBaseModule constructor,
apply_to/restore/merge_to, and the kohya front end's `network_module_dict` table."""


class GLoKrModule(LycorisBaseModule):
    """One layer's GLoKr update (linear layers and 1x1/3x3 Conv2d with groups = 1)."""

    name = ALGO
    support_module = {"linear", "conv2d"}
    weight_list = ["glokr_a_w1", "glokr_a_w2", "glokr_a_w2_a", "glokr_a_w2_b",
                   "glokr_b_w1", "glokr_b_w2", "glokr_b_w2_a", "glokr_b_w2_b", "alpha"]
    weight_list_det = ["glokr_a_w1"]

    def __init__(self, lora_name, org_module: nn.Module, multiplier=1.0, lora_dim=4, alpha=1, dropout=0.0,
                 rank_dropout=0.0, module_dropout=0.0, use_tucker=False, *, factor: int = -1,
                 weight_decompose=False, rank_dropout_scale=False, bypass_mode=None, **kwargs):
        # LyCORIS's kohya front end passes every network argument to every module (block_size, constraint,
        # rescaled, ...); those of other algorithms are ignored, the ones GLoKr cannot honour are refused.
        super().__init__(lora_name, org_module, multiplier, dropout, rank_dropout, module_dropout,
                         rank_dropout_scale, bypass_mode)
        if self.module_type not in self.support_module:
            raise ValueError(f"{lora_name}: GLoKr supports Linear and Conv2d layers, not {self.module_type}")
        if self.module_type == "conv2d" and org_module.groups != 1:
            raise ValueError(f"{lora_name}: GLoKr does not support grouped convolutions (groups={org_module.groups})")
        if use_tucker:
            raise ValueError("GLoKr has no Tucker (use_tucker) form")
        if weight_decompose:
            raise ValueError("GLoKr has no weight-decomposed (DoRA) form")
        out_dim, in_dim, *kernel = self.shape
        self.kernel = tuple(kernel)
        self.lora_dim = int(lora_dim)
        self.factor = int(factor)
        self.in_split = factorization(in_dim, self.factor)  # (in_m, in_n)
        self.out_split = factorization(out_dim, self.factor)  # (out_l, out_k)
        in_m, in_n = self.in_split
        out_l, out_k = self.out_split
        r = self.lora_dim

        # A = kron(a_w1, a_w2): in x in.
        self.glokr_a_w1 = nn.Parameter(torch.empty(in_m, in_m))
        self.a_low_rank = r < in_n / 2
        if self.a_low_rank:
            self.glokr_a_w2_a = nn.Parameter(torch.empty(in_n, r))
            self.glokr_a_w2_b = nn.Parameter(torch.empty(r, in_n))
        else:
            self.glokr_a_w2 = nn.Parameter(torch.empty(in_n, in_n))
        # B = kron(b_w1, b_w2): out x in (x kernel).
        self.glokr_b_w1 = nn.Parameter(torch.empty(out_l, in_m))
        self.b_low_rank = r < max(out_k, in_n) / 2
        if self.b_low_rank:
            self.glokr_b_w2_a = nn.Parameter(torch.empty(out_k, r))
            self.glokr_b_w2_b = nn.Parameter(torch.empty(r, in_n, *self.kernel))
        else:
            self.glokr_b_w2 = nn.Parameter(torch.empty(out_k, in_n, *self.kernel))

        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float())
        alpha = float(r if alpha is None or alpha == 0 else alpha)
        self.scale = alpha / r
        self.register_buffer("alpha", torch.tensor(alpha))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """w1 and w2_a random (Kaiming, as LoRA's down), w2_b (or the full w2) zero (as LoRA's up): the update
        is exactly zero, the zero factor gets a gradient at the first step through the random ones, and
        those follow from the second step on."""
        for half in ("a", "b"):
            nn.init.kaiming_uniform_(getattr(self, f"glokr_{half}_w1"), a=math.sqrt(5))
            if getattr(self, f"{half}_low_rank"):
                nn.init.kaiming_uniform_(getattr(self, f"glokr_{half}_w2_a"), a=math.sqrt(5))
                nn.init.zeros_(getattr(self, f"glokr_{half}_w2_b"))
            else:
                nn.init.zeros_(getattr(self, f"glokr_{half}_w2"))

    @classmethod
    def make_module_from_state_dict(cls, lora_name, orig_module, *weights):
        # A file's tensors do not say the rank when both w2 factors are full, and alpha / rank scales the
        # update: GLoKr files are rebuilt from difftune's metadata (lycoris_net.load_lora_file), not here.
        raise NotImplementedError("GLoKr modules are rebuilt from the settings in difftune's file metadata")

    # ------------------------------------------------------------------------------------- factors
    def a_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_w1, a_w2) with a_w2 = a_w2_a @ a_w2_b when low-rank: A = kron(a_w1, a_w2)."""
        w2 = self.glokr_a_w2_a @ self.glokr_a_w2_b if self.a_low_rank else self.glokr_a_w2
        return self.glokr_a_w1, w2

    def b_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(b_w1, b_w2), b_w2 out_k x in_n (x kernel): B = kron(b_w1, b_w2)."""
        if self.b_low_rank:
            w2_b = self.glokr_b_w2_b
            w2 = (self.glokr_b_w2_a @ w2_b.reshape(w2_b.shape[0], -1)).reshape(self.out_split[1], *w2_b.shape[1:])
        else:
            w2 = self.glokr_b_w2
        return self.glokr_b_w1, w2

    def b_weight(self) -> torch.Tensor:
        """B, shaped as the layer's weight."""
        w1, w2 = self.b_factors()
        return torch.kron(w1.reshape(*w1.shape, *[1] * len(self.kernel)), w2)

    def w_times_a(self, weight: torch.Tensor) -> torch.Tensor:
        """W·A without building A: with W's input axis split (in_m, in_n), (W·kron(P, Q))[o, (c, d)] =
        sum over (a, b) of W[o, (a, b)]·P[a, c]·Q[b, d]; out·in·(in_m + in_n) products instead of out·in²."""
        p, q = self.a_factors()
        in_m, in_n = self.in_split
        w = weight.reshape(weight.shape[0], in_m, in_n, *self.kernel).to(p.dtype)
        w = torch.einsum("oab...,ac->ocb...", w, p)
        w = torch.einsum("ocb...,bd->ocd...", w, q)
        return w.reshape(weight.shape)

    def unscaled_diff(self) -> torch.Tensor:
        """W·A + B (the update before alpha/rank and the multiplier), W the frozen base weight."""
        return self.w_times_a(self._current_weight().to(self.glokr_a_w1.device)) + self.b_weight()

    # ---------------------------------------------------------------------- what LyCORIS calls
    def get_diff_weight(self, multiplier=1.0, shape=None, device=None):
        diff = self.unscaled_diff() * (self.scale * multiplier)
        if shape is not None:
            diff = diff.view(shape)
        if device is not None:
            diff = diff.to(device)
        return diff, None

    def get_merged_weight(self, multiplier=1.0, shape=None, device=None):
        diff, _ = self.get_diff_weight(multiplier, shape, device)
        weight = self.org_weight
        return weight + diff.to(weight.dtype), None

    def _training_noise(self, delta: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """Rank dropout (whole output channels of the update, as LyCORIS's LoKr drops rows of its update)
        and dropout on the update's output, while training."""
        if self.training and self.rank_dropout:
            keep = (torch.rand(self.shape[0]) > self.rank_dropout).to(delta.dtype)
            if self.rank_dropout_scale:
                keep = keep / keep.mean().clamp_min(1e-12)
            shape = [1] * delta.dim()
            shape[channel_dim] = -1
            delta = delta * keep.to(delta.device).view(shape)
        return self.drop(delta)

    def _channel_dim(self, x: torch.Tensor) -> int:
        return 1 if self.module_type == "conv2d" else x.dim() - 1

    def _apply_a(self, x: torch.Tensor) -> torch.Tensor:
        """A applied to the input channels: kron(P, Q)·v = vec(P·V·Qᵀ) with v = vec(V), V in_m x in_n."""
        p, q = (f.to(x.dtype) for f in self.a_factors())
        h = x.movedim(1, -1) if self.module_type == "conv2d" else x
        h = h.reshape(*h.shape[:-1], *self.in_split)
        h = (p @ h @ q.transpose(0, 1)).flatten(-2)
        return h.movedim(-1, 1) if self.module_type == "conv2d" else h

    def _apply_b(self, x: torch.Tensor) -> torch.Tensor:
        if self.module_type == "conv2d":
            return self.op(x, self.b_weight().to(x.dtype), None, **self.kw_dict)
        w1, w2 = (f.to(x.dtype) for f in self.b_factors())
        h = x.reshape(*x.shape[:-1], *self.in_split)
        return (w1 @ h @ w2.transpose(0, 1)).flatten(-2)

    def bypass_forward_diff(self, x, scale=1):
        """The update's output without rebuilding a weight: W·(A·x) through the layer itself (its bias taken
        back out), plus B·x; what LyCORIS uses when the base layer is quantized."""
        wax = self.org_forward(self._apply_a(x))
        bias = self.org_module[0].bias
        if bias is not None:
            shape = [1] * wax.dim()
            shape[self._channel_dim(wax)] = -1
            wax = wax - bias.to(wax.dtype).view(shape)
        delta = (wax + self._apply_b(x)) * (self.scale * scale)
        return self._training_noise(delta, self._channel_dim(delta))

    def bypass_forward(self, x, scale=1):
        return self.org_forward(x) + self.bypass_forward_diff(x, scale=scale)

    def forward(self, x, *args, **kwargs):
        if self.module_dropout and self.training and torch.rand(1) < self.module_dropout:
            return self.org_forward(x, *args, **kwargs)
        if self.bypass_mode:
            return self.bypass_forward(x, self.multiplier)
        base = self.org_forward(x, *args, **kwargs)
        diff = self.get_diff_weight(self.multiplier)[0].to(device=x.device, dtype=x.dtype)
        delta = self.op(x, diff, None, **self.kw_dict)
        return base + self._training_noise(delta, self._channel_dim(delta))


# ------------------------------------------------------------------------------------ registration
class LycorisHookMissing(RuntimeError):
    """The installed LyCORIS lacks the module table its kohya front end would find GLoKr in, or the module
    base API GLoKrModule is written against."""


def lycoris_version() -> str:
    try:
        return metadata.version("lycoris-lora")
    except metadata.PackageNotFoundError:
        return "unknown"


def register() -> None:
    """Put GLoKrModule in the table LyCORIS's kohya front end (LycorisNetworkKohya) looks `network_module`
    up in: `lycoris.wrapper.network_module_dict`, the dict lycoris.kohya imports by name (LyCORIS 4.1.3).
    Raises LycorisHookMissing, naming the installed version, when that table, or the module base API
    GLoKrModule relies on, is not there."""
    version = lycoris_version()
    lacks = [name for name in ("_current_weight", "apply_to", "restore", "merge_to") if not hasattr(LycorisBaseModule, name)]
    if "bypass_mode" not in inspect.signature(LycorisBaseModule.__init__).parameters:
        lacks.append("the bypass_mode argument")
    if lacks:
        raise LycorisHookMissing(f"network.type = 'glokr': lycoris-lora {version}'s LycorisBaseModule lacks "
                                 f"{', '.join(lacks)} (GLoKr is written for lycoris-lora {WRITTEN_FOR_LYCORIS}); "
                                 f"install lycoris-lora=={WRITTEN_FOR_LYCORIS}, or use network.type = 'lokr' or 'glora'")
    try:
        from lycoris import kohya, wrapper
    except ImportError as e:
        raise LycorisHookMissing(f"network.type = 'glokr' needs LyCORIS's kohya front end, which does not import "
                                 f"(lycoris-lora {version}): {e}") from e
    table = getattr(wrapper, "network_module_dict", None)
    if not isinstance(table, dict) or getattr(kohya, "network_module_dict", None) is not table:
        raise LycorisHookMissing(
            f"network.type = 'glokr': lycoris-lora {version} has no lycoris.wrapper.network_module_dict shared with "
            f"lycoris.kohya, the table difftune registers GLoKr in (written for lycoris-lora {WRITTEN_FOR_LYCORIS}); "
            f"install lycoris-lora=={WRITTEN_FOR_LYCORIS}, or use network.type = 'lokr' or 'glora'")
    present = table.get(ALGO)
    if present is not None and present is not GLoKrModule:
        raise LycorisHookMissing(f"lycoris-lora {version} already has a module named '{ALGO}' ({present.__module__}."
                                 f"{present.__name__}); difftune's GLoKr would replace it: pin lycoris-lora=="
                                 f"{WRITTEN_FOR_LYCORIS}")
    table[ALGO] = GLoKrModule


REGISTRATION_PROBLEM: str | None = None
"""Why GLoKr could not be registered at import (None when it was); building a glokr network raises it."""
try:
    register()
except LycorisHookMissing as problem:
    REGISTRATION_PROBLEM = str(problem)
