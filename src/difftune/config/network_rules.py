"""Which `[network]` settings each LoRA-family algorithm uses, and its defaults.

Pure data (no torch), so the config schema can check a network section at load time and the network
builder reads the same facts: one table, not two lists that drift apart. Algorithms come from LyCORIS,
the library the community's LoRA/LoHa/LoKr/OFT files are made with.
"""

from __future__ import annotations

from dataclasses import dataclass

# Settings a network section can carry besides `type`, `preset` and `init_from` (always valid).
RANK_KEYS = ("rank", "alpha")
CONV_KEYS = ("conv_rank", "conv_alpha")
DROPOUT_KEYS = ("rank_dropout", "module_dropout")


@dataclass(frozen=True)
class Algorithm:
    lycoris: str
    """LyCORIS `algo` name ('glokr': difftune's own module, which network/glokr.py registers with LyCORIS)."""
    keys: frozenset[str]
    """`network.*` settings this algorithm uses."""
    default_preset: str
    dora: bool = False
    """Supports weight decomposition (DoRA)."""
    lora_layout: bool = False
    """Exports plain lora_down/lora_up/alpha tensors, which the diffusers/PEFT layout can express."""
    summary: str = ""


def _keys(*groups) -> frozenset[str]:
    return frozenset(k for g in groups for k in ((g,) if isinstance(g, str) else g))


ALGORITHMS: dict[str, Algorithm] = {
    "lora": Algorithm("lora", _keys(RANK_KEYS, "dropout", DROPOUT_KEYS), "attn-mlp", dora=True, lora_layout=True,
                      summary="low-rank update of linear layers (kohya networks.lora)"),
    "locon": Algorithm("locon", _keys(RANK_KEYS, CONV_KEYS, "dropout", DROPOUT_KEYS), "full", dora=True,
                       lora_layout=True, summary="LoRA on linear and 3x3 conv layers"),
    "loha": Algorithm("loha", _keys(RANK_KEYS, CONV_KEYS, "dropout", DROPOUT_KEYS), "full", dora=True,
                      summary="Hadamard product of two low-rank updates"),
    "lokr": Algorithm("lokr", _keys(RANK_KEYS, CONV_KEYS, "dropout", DROPOUT_KEYS, "factor"), "full", dora=True,
                      summary="Kronecker product update"),
    "dylora": Algorithm("dylora", _keys(RANK_KEYS, CONV_KEYS, DROPOUT_KEYS, "block_size"), "full", lora_layout=True,
                        summary="LoRA trained for every rank up to `rank` at once (exports a plain LoRA)"),
    # LyCORIS 4.1.3's GLoRA forward (weight rebuild) applies module_dropout only: dropout and rank_dropout are refused
    "glora": Algorithm("glora", _keys(RANK_KEYS, CONV_KEYS, "module_dropout"), "full",
                       summary="generalised LoRA (weight, bias and prompt-like terms)"),
    "glokr": Algorithm("glokr", _keys(RANK_KEYS, CONV_KEYS, "dropout", DROPOUT_KEYS, "factor"), "full",
                       summary="GLoRA's W + W·A + B with A and B Kronecker products, as LoKr's "
                       "(difftune's own module: merge it with `difftune merge` for UIs)"),
    "ia3": Algorithm("ia3", _keys(DROPOUT_KEYS), "ia3", summary="learned per-channel scaling of keys, values and FF"),
    "diag-oft": Algorithm("diag-oft", _keys("dropout", DROPOUT_KEYS, "block_size", "constraint", "rescaled"), "full",
                          summary="orthogonal fine-tuning with block-diagonal rotations"),
    "boft": Algorithm("boft", _keys(DROPOUT_KEYS, "block_size", "constraint", "rescaled"), "full",
                      summary="butterfly orthogonal fine-tuning"),
    "full": Algorithm("full", _keys(DROPOUT_KEYS), "attn-mlp",
                      summary="LyCORIS native fine-tuning: trains the targeted weights themselves, exports their difference"),
}

# Not a LyCORIS algorithm: new token vectors for the text encoders (network/textual_inversion.py).
TEXTUAL_INVERSION = "textual_inversion"
TI_ALIASES = {"textual-inversion": TEXTUAL_INVERSION, "ti": TEXTUAL_INVERSION, "embedding": TEXTUAL_INVERSION}
TI_KEYS = ("token", "init_word", "num_vectors")
"""`network.*` settings of the textual-inversion vectors: with type = 'textual_inversion', or with
`pivotal = true` beside a LoRA-family algorithm."""
EMBEDDING_ROLE = "embedding"
"""The LR group (and trained role) of the textual-inversion vectors."""

# Asked for by users, but not in the LyCORIS release difftune builds on.
UNSUPPORTED = {
    "tlora": "timestep-masked LoRA needs per-step masks the trainer does not set; use 'lora'",
}

# Layer selections, named like LyCORIS presets so its users recognise them (see network/presets.py).
PRESETS = {
    "attn-only": "attention projections (UNet to_q/k/v/out, text encoder q/k/v/out_proj)",
    "attn-mlp": "whole transformer blocks: attention, feed-forward, proj_in/out (kohya's LoRA default)",
    "full-lin": "every linear and 1x1 layer of the UNet (adds ResNet time embeddings and shortcuts)",
    "full": "full-lin plus 3x3 convolutions (conv_in/out, ResNets, up/down samplers)",
    "ia3": "keys, values and the feed-forward output ((IA)^3 paper)",
}

DEFAULT_RANK = 16
# BOFT splits a layer's outputs into 2^k blocks of an even size <= block_size: 8 cannot split SD's 320-wide
# layers (320 = 10 x 2^5), 16 fits every SD 1.x/2.x layer.
DEFAULT_BLOCK_SIZE = {"dylora": 4, "diag-oft": 8, "boft": 16}
LORA_FORMATS = ("kohya", "diffusers", "both")
FULL_FINETUNE_TYPES = (None, "none")


def valid_types() -> str:
    return ", ".join([*ALGORITHMS, TEXTUAL_INVERSION]) + " (or leave unset / 'none' for a full fine-tune)"


def types_using(key: str) -> list[str]:
    return [name for name, algo in ALGORITHMS.items() if key in algo.keys]


def check_type(value: str | None) -> str | None:
    """Normalise and check `network.type`; raises ValueError with the valid names."""
    if value is None:
        return None
    name = value.strip().lower()
    if name in ("none", ""):
        return "none"
    name = TI_ALIASES.get(name, name)
    if name == TEXTUAL_INVERSION:
        return name
    if name in UNSUPPORTED:
        raise ValueError(f"'{name}' is not supported: {UNSUPPORTED[name]}")
    if name not in ALGORITHMS:
        raise ValueError(f"unknown network type; valid: {valid_types()}")
    return name


def check_key(key: str, value, network_type: str | None) -> None:
    """A setting given for a network type that does not use it is an error, not a silent no-op."""
    if network_type in FULL_FINETUNE_TYPES:
        raise ValueError(
            f"network.{key} has no effect on a full fine-tune (network.type is not set); "
            f"set network.type to one of: {', '.join(types_using(key)) or ', '.join(ALGORITHMS)}"
        )
    if network_type == TEXTUAL_INVERSION:
        raise ValueError(
            f"network.{key} is not used by network.type = 'textual_inversion', which trains token vectors only "
            f"(network.token, init_word, num_vectors); to train a {', '.join(types_using(key)[:2])} network with the "
            "vectors, set network.type to it and network.pivotal = true"
        )
    if network_type not in ALGORITHMS:
        return  # the type itself is reported
    if key not in ALGORITHMS[network_type].keys:
        hint = ""
        if key in CONV_KEYS and network_type == "lora":
            hint = " ('lora' trains linear layers; use network.type = 'locon' for 3x3 convolutions)"
        elif key in RANK_KEYS and network_type in ("diag-oft", "boft"):
            hint = " (OFT's size setting is network.block_size)"
        raise ValueError(
            f"network.{key} is not used by network.type = '{network_type}'{hint}; "
            f"it applies to: {', '.join(types_using(key))}"
        )


def resolved_preset(network_type: str, preset: str | None) -> str:
    return preset or ALGORITHMS[network_type].default_preset


def check_preset(preset: str | None, network_type: str | None) -> None:
    if preset is None:
        return
    if network_type == TEXTUAL_INVERSION:
        raise ValueError("network.preset selects layers of a LoRA-family network; textual inversion trains token "
                         "vectors only (network.pivotal = true with a LoRA type trains both)")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset; valid: {', '.join(PRESETS)}")
    if network_type in FULL_FINETUNE_TYPES:
        raise ValueError("network.preset has no effect on a full fine-tune (network.type is not set)")
    if network_type == "lora" and preset == "full":
        raise ValueError(
            "'lora' trains linear layers only; for 3x3 convolutions use network.type = 'locon' "
            "(or preset 'full-lin' for every linear layer)"
        )


def check_conv(network_type: str | None, preset: str | None) -> None:
    """conv_rank/conv_alpha only matter when the preset reaches 3x3 convolutions."""
    if network_type in ALGORITHMS and resolved_preset(network_type, preset) != "full":
        raise ValueError(
            f"conv layers are only trained with network.preset = 'full' (now '{resolved_preset(network_type, preset)}')"
        )


def check_dora(network_type: str | None, dropout: float) -> None:
    if network_type == TEXTUAL_INVERSION:
        raise ValueError("network.dora decomposes a LoRA-family network's weights; textual inversion trains token "
                         "vectors only (network.pivotal = true with a LoRA type trains both)")
    if network_type in FULL_FINETUNE_TYPES:
        raise ValueError("network.dora needs a network.type: one of " + ", ".join(n for n, a in ALGORITHMS.items() if a.dora))
    if network_type in ALGORITHMS and not ALGORITHMS[network_type].dora:
        raise ValueError(
            f"DoRA (weight decomposition) is not available for network.type = '{network_type}' in LyCORIS; "
            f"it is for: {', '.join(n for n, a in ALGORITHMS.items() if a.dora)}"
        )
    if dropout:
        raise ValueError("LyCORIS ignores network.dropout with DoRA; use rank_dropout/module_dropout or set dropout = 0")


def check_lora_format(lora_format: str, network_type: str | None, dora: bool) -> str | None:
    """The diffusers/PEFT layout holds plain low-rank pairs only; returns a problem or None."""
    if lora_format == "kohya" or network_type in FULL_FINETUNE_TYPES or network_type not in ALGORITHMS:
        return None  # textual inversion writes embedding files, whatever the LoRA format
    algo = ALGORITHMS[network_type]
    if not algo.lora_layout:
        layout_types = ", ".join(n for n, a in ALGORITHMS.items() if a.lora_layout)
        loaders = ("difftune loads it; merge it with `difftune merge` for UIs" if network_type == "glokr"
                   else "ComfyUI, A1111/Forge and kohya's scripts load it")
        return (
            f"output.lora_format = '{lora_format}': the diffusers/PEFT layout cannot hold '{network_type}' weights "
            f"(it stores plain low-rank pairs: {layout_types}); use output.lora_format = 'kohya' ({loaders})"
        )
    if dora:
        return (
            f"output.lora_format = '{lora_format}': diffusers' Stable Diffusion LoRA loader drops DoRA's "
            "dora_scale, so the file would not reproduce the trained network; use output.lora_format = 'kohya'"
        )
    return None


def check_textual_inversion(network) -> str | None:
    """The token settings (TI_KEYS) and `pivotal` against the type; returns a problem or None."""
    is_ti = network.type == TEXTUAL_INVERSION
    defaults = {k: type(network).model_fields[k].default for k in TI_KEYS}  # a resolved config writes them out
    given = [k for k in TI_KEYS if getattr(network, k) != defaults[k]]
    if network.pivotal and network.type in FULL_FINETUNE_TYPES:
        return ("network.pivotal = true trains textual-inversion vectors together with a LoRA-family network; set "
                f"network.type to one of {', '.join(ALGORITHMS)} (or 'textual_inversion' for the vectors alone)")
    if network.pivotal and is_ti:
        return ("network.pivotal = true adds a LoRA-family network to the vectors: set network.type to that "
                "algorithm (e.g. 'lora'); 'textual_inversion' alone trains the vectors only")
    if not (is_ti or network.pivotal):
        if given:
            return (f"network.{given[0]} is a textual-inversion setting: set network.type = 'textual_inversion', or "
                    "network.pivotal = true with a LoRA-family type")
        return None
    if not network.token:
        return ("network.token is needed: the new word textual inversion learns (e.g. '<sks>'); write it in the "
                "captions where the concept appears")
    if not network.init_word.strip():
        return "network.init_word is empty: give a word the vectors start from (e.g. 'person', 'style'; default '*')"
    return None
