"""Black Forest Labs' own Flux.1 layout, the one `flux1-dev.safetensors` and ComfyUI/Forge use, against
diffusers' `FluxTransformer2DModel`: for whole state dicts (single files) and for LoRA files.

The two name the same layers differently, and BFL fuses some of diffusers' separate ones:
`double_blocks.N.img_attn.qkv` is `transformer_blocks.N.attn.to_q|to_k|to_v` stacked on the output axis,
`txt_attn.qkv` the `add_q/k/v_proj`, and `single_blocks.N.linear1` is the single block's q, k, v and
`proj_mlp` (4 x wider). The final modulation stores shift before scale, diffusers scale before shift.
Everything else maps one to one. The tables below are the one statement of that mapping (read from
diffusers' `convert_flux_transformer_checkpoint_to_diffusers` and ComfyUI's `flux_to_diffusers`); the
state-dict converters and the LoRA layout are built on them.

kohya's LoRA files for Flux (what ComfyUI and Forge read, and sd-scripts writes) name layers
`lora_unet_<BFL path with _>`. A plain LoRA on diffusers' q, k and v becomes one LoRA on the fused
layer: the down matrices stacked (rank 3r) and the up matrices block-diagonal, with alpha 3·alpha, so
alpha/rank and the update are unchanged (sd-scripts' `convert_flux_lora.py` and diffusers' converter
of kohya files build and read it so). Algorithms whose update is not a plain product (LoHa, LoKr,
DoRA, OFT, IA3, ...) cannot be fused; their split layers are written as
`lora_transformer_<diffusers path with _>`, names ComfyUI maps onto slices of the fused weight
(OneTrainer's layout).
"""

from __future__ import annotations

import re

import torch

from difftune.errors import LoraFormatError

SCOPES = {"double": ("transformer_blocks", "double_blocks"), "single": ("single_transformer_blocks", "single_blocks")}
"""Block kinds: (diffusers ModuleList, BFL ModuleList)."""

LINEARS = {
    "double": {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
               "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
               "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
               "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"},
    "single": {"proj_out": "linear2", "norm.linear": "modulation.lin"},
    "top": {"x_embedder": "img_in", "context_embedder": "txt_in",
            "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
            "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
            "proj_out": "final_layer.linear"},
}
"""diffusers module path → BFL module path, for layers that map one to one (weight and bias)."""

FUSED = {
    "double": {"img_attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), (1, 1, 1)),
               "txt_attn.qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (1, 1, 1))},
    "single": {"linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (1, 1, 1, 4))},
    "top": {},
}
"""BFL fused layer → (its diffusers parts in output order, their relative output widths)."""

NORMS = {
    "double": {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
               "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"},
    "single": {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"},
    "top": {},
}
"""RMSNorms: diffusers `<path>.weight` is BFL `<path>.scale`."""

SWAPPED = {"norm_out.linear": "final_layer.adaLN_modulation.1"}
"""The final modulation: the same matrix with its two output halves (shift, scale) swapped."""

SINGLE_FILE_PREFIX = "model.diffusion_model."
"""What checkpoints that bundle the transformer (ComfyUI's 'checkpoint' saves) put before BFL keys."""

LORA_PREFIX, SPLIT_PREFIX = "lora_unet_", "lora_transformer_"


def _parse(path: str, side: int) -> tuple[str, str, str]:
    """(scope, block prefix with its index, path inside the block) of a diffusers (side 0) or BFL (side 1) path."""
    for scope, names in SCOPES.items():
        head = names[side] + "."
        if path.startswith(head):
            index, _, rest = path[len(head):].partition(".")
            if index.isdigit():
                return scope, f"{names[side]}.{index}.", rest
    return "top", "", path


def _other_prefix(scope: str, prefix: str, side: int) -> str:
    if scope == "top":
        return ""
    index = prefix.rstrip(".").rsplit(".", 1)[-1]
    return f"{SCOPES[scope][1 - side]}.{index}."


def _widths(total: int, ratios: tuple[int, ...], what: str) -> list[int]:
    unit, rest = divmod(total, sum(ratios))
    if rest:
        raise ValueError(f"{what}: {total} outputs do not split as {'+'.join(map(str, ratios))}")
    return [unit * r for r in ratios]


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# --------------------------------------------------------------------------------- state dicts
def diffusers_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in BFL names (what save_single_file writes)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        scope, prefix, rest = _parse(module, 0)
        bfl_prefix = _other_prefix(scope, prefix, 0)
        if rest in LINEARS[scope]:
            out[f"{bfl_prefix}{LINEARS[scope][rest]}.{param}"] = value
        elif rest in NORMS[scope] and param == "weight":
            out[f"{bfl_prefix}{NORMS[scope][rest]}.scale"] = value
        elif scope == "top" and rest in SWAPPED:
            out[f"{SWAPPED[rest]}.{param}"] = _swap_halves(value)
        else:
            group = next((name for name, (parts, _) in FUSED[scope].items() if rest in parts), None)
            if group is None:
                unknown.append(key)
                continue
            fused.setdefault(f"{bfl_prefix}{group}.{param}", {})[rest] = value
    for key, parts in fused.items():
        scope, _, rest = _parse(key.rpartition(".")[0], 1)
        names, _ = FUSED[scope][rest]
        out[key] = torch.cat([parts[n] for n in names], dim=0)
    if unknown:
        raise ValueError(f"no BFL name for {len(unknown)} tensor(s), e.g. {unknown[0]}")
    return out


def bfl_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL/ComfyUI transformer tensors (optionally under `model.diffusion_model.`) → FluxTransformer2DModel names.
    ValueError naming the first key that is not part of Flux's layout."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    inverse = {scope: {bfl: ours for ours, bfl in table.items()} for scope, table in LINEARS.items()}
    norms = {scope: {bfl: ours for ours, bfl in table.items()} for scope, table in NORMS.items()}
    swapped = {bfl: ours for ours, bfl in SWAPPED.items()}
    for key, value in state_dict.items():
        key = key.removeprefix(SINGLE_FILE_PREFIX)
        module, _, param = key.rpartition(".")
        scope, prefix, rest = _parse(module, 1)
        ours = _other_prefix(scope, prefix, 1)
        if rest in inverse[scope]:
            out[f"{ours}{inverse[scope][rest]}.{param}"] = value
        elif rest in norms[scope] and param == "scale":
            out[f"{ours}{norms[scope][rest]}.weight"] = value
        elif scope == "top" and rest in swapped:
            out[f"{swapped[rest]}.{param}"] = _swap_halves(value)
        elif rest in FUSED[scope]:
            names, ratios = FUSED[scope][rest]
            for name, part in zip(names, value.split(_widths(value.shape[0], ratios, key), dim=0), strict=True):
                out[f"{ours}{name}.{param}"] = part.clone()
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} tensor(s) are not part of the Flux.1 transformer, e.g. {unknown[0]!r}")
    return out


# ----------------------------------------------------------------------------------- LoRA files
PLAIN = {"lora_down.weight", "lora_up.weight", "alpha"}


class KohyaFluxLayout:
    """kohya's Flux LoRA layout over LyCORIS-named tensors (`lora_unet_<diffusers path with _>`):
    `to_file` writes BFL names (fusing plain LoRAs on q/k/v[/mlp]), `from_file` reads them back, and
    also reads `lora_transformer_` names and LyCORIS's own. Text-encoder layers pass through."""

    def __init__(self):
        self._ours = {}  # (scope, underscored diffusers rest) → ("linear", bfl rest) | ("fused", bfl rest, index)
        self._theirs = {}  # (scope, underscored bfl rest) → ("linear", diffusers rest) | ("fused", parts, ratios)
        for scope in LINEARS:
            for ours, bfl in LINEARS[scope].items():
                self._ours[scope, ours.replace(".", "_")] = ("linear", bfl)
                self._theirs[scope, bfl.replace(".", "_")] = ("linear", ours)
            for bfl, (parts, ratios) in FUSED[scope].items():
                for index, part in enumerate(parts):
                    self._ours[scope, part.replace(".", "_")] = ("fused", bfl, index)
                self._theirs[scope, bfl.replace(".", "_")] = ("fused", parts, ratios)

    @staticmethod
    def _split_name(name: str, side: int) -> tuple[str, str, str] | None:
        """(scope, block index or "", underscored rest) of a `lora_unet_` name on one side; None otherwise."""
        if not name.startswith(LORA_PREFIX):
            return None
        body = name[len(LORA_PREFIX):]
        for scope, names in SCOPES.items():
            found = re.match(rf"{names[side]}_(\d+)_(.+)$", body)
            if found:
                return scope, found.group(1), found.group(2)
        return "top", "", body

    @staticmethod
    def _join(scope: str, index: str, rest: str, side: int) -> str:
        block = f"{SCOPES[scope][side]}_{index}_" if scope != "top" else ""
        return f"{LORA_PREFIX}{block}{rest.replace('.', '_')}"

    # ---------------------------------------------------------------------------- writing
    def to_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        groups: dict[tuple, dict[int, tuple[str, dict]]] = {}
        for module, parts in _by_module(tensors).items():
            parsed = self._split_name(module, 0)
            entry = self._ours.get(parsed[::2]) if parsed else None
            if entry is None:
                # text encoders pass; a transformer layer BFL has no name for (norm_out) gets ComfyUI's diffusers name
                _put(out, SPLIT_PREFIX + module[len(LORA_PREFIX):] if parsed else module, parts)
            elif entry[0] == "linear":
                _put(out, self._join(parsed[0], parsed[1], entry[1], 1), parts)
            else:
                groups.setdefault((parsed[0], parsed[1], entry[1]), {})[entry[2]] = (module, parts)
        for (scope, index, fused), members in groups.items():
            names, ratios = FUSED[scope][fused]
            if len(members) == len(names) and _fusable([parts for _, parts in members.values()]):
                _put(out, self._join(scope, index, fused, 1), _fuse([members[i][1] for i in range(len(names))]))
            else:
                for module, parts in members.values():
                    _put(out, SPLIT_PREFIX + module[len(LORA_PREFIX):], parts)
        return out

    # ---------------------------------------------------------------------------- reading
    def from_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for module, parts in _by_module(tensors).items():
            if module.startswith(SPLIT_PREFIX):
                _put(out, LORA_PREFIX + module[len(SPLIT_PREFIX):], parts)
                continue
            parsed = self._split_name(module, 1)
            entry = self._theirs.get(parsed[::2]) if parsed else None
            if entry is None:
                _put(out, module, parts)  # LyCORIS names already, or text encoders
            elif entry[0] == "linear":
                _put(out, self._join(parsed[0], parsed[1], entry[1], 0), parts)
            else:
                names, ratios = entry[1], entry[2]
                for name, split in zip(names, _split(parts, ratios, module), strict=True):
                    _put(out, self._join(parsed[0], parsed[1], name, 0), split)
        return out


def _by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, tensor = key.partition(".")
        modules.setdefault(module, {})[tensor] = value
    return modules


def _put(out: dict, module: str, parts: dict[str, torch.Tensor]) -> None:
    for tensor, value in parts.items():
        out[f"{module}.{tensor}"] = value


def _fusable(members: list[dict[str, torch.Tensor]]) -> bool:
    """Plain linear LoRA pairs of one rank (what one fused pair can hold exactly)."""
    if not all({"lora_down.weight", "lora_up.weight"} <= set(p) <= PLAIN for p in members):
        return False
    if not all(p["lora_down.weight"].dim() == 2 and p["lora_up.weight"].dim() == 2 for p in members):
        return False
    return len({p["lora_down.weight"].shape[0] for p in members}) == 1


def _fuse(members: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One LoRA pair for the stacked layers: downs stacked, ups block-diagonal, alpha/rank kept."""
    downs = [p["lora_down.weight"] for p in members]
    ups = [p["lora_up.weight"] for p in members]
    rank = downs[0].shape[0]
    total = rank * len(members)
    alpha = members[0].get("alpha")
    first_alpha = float(alpha) if alpha is not None else float(rank)
    up = torch.zeros(sum(u.shape[0] for u in ups), total, dtype=ups[0].dtype, device=ups[0].device)
    row = 0
    for j, (part, member) in enumerate(zip(ups, members, strict=True)):
        own = float(member["alpha"]) if "alpha" in member else float(rank)
        # one alpha for the fused pair: a part trained with another alpha/rank carries the ratio in its up
        block = part if own == first_alpha else (part.float() * (own / first_alpha)).to(part.dtype)
        up[row: row + part.shape[0], j * rank: (j + 1) * rank] = block
        row += part.shape[0]
    alpha_dtype = alpha.dtype if alpha is not None else downs[0].dtype
    return {"lora_down.weight": torch.cat(downs, dim=0), "lora_up.weight": up,
            "alpha": torch.tensor(first_alpha * len(members), dtype=alpha_dtype)}


def _split(parts: dict[str, torch.Tensor], ratios: tuple[int, ...], module: str) -> list[dict[str, torch.Tensor]]:
    """A plain LoRA on a fused BFL layer as one pair per diffusers layer, with the same update.

    Block-diagonal ups (how fused files of separately trained layers are written) give each layer its own
    rank-r block back; otherwise (a LoRA trained on the fused layer) every layer shares the down matrix."""
    if not {"lora_down.weight", "lora_up.weight"} <= set(parts) <= PLAIN:
        raise LoraFormatError(
            f"{module}: tensors {sorted(parts)} on a fused BFL layer cannot be split into diffusers' separate "
            "layers (only a plain LoRA pair can); write such networks for diffusers' layers instead")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    rank, n = down.shape[0], len(ratios)
    try:
        widths = _widths(up.shape[0], ratios, module)
    except ValueError as e:
        raise LoraFormatError(str(e)) from None
    alpha = parts.get("alpha", torch.tensor(float(rank)))
    rows = [sum(widths[:j]) for j in range(n)]
    block = rank // n if rank % n == 0 else 0
    diagonal = block > 0 and all(
        not up[rows[j]: rows[j] + widths[j], k * block: (k + 1) * block].any()
        for j in range(n) for k in range(n) if j != k)
    out = []
    for j in range(n):
        rows_j = slice(rows[j], rows[j] + widths[j])
        if diagonal:
            cols = slice(j * block, (j + 1) * block)
            out.append({"lora_down.weight": down[cols].clone(), "lora_up.weight": up[rows_j, cols].clone(),
                        "alpha": (alpha.float() * block / rank).to(alpha.dtype)})
        else:
            out.append({"lora_down.weight": down.clone(), "lora_up.weight": up[rows_j].clone(),
                        "alpha": alpha.clone()})
    return out


KOHYA_LAYOUT = KohyaFluxLayout()
