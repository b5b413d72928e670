"""Textual inversion: new token vectors for the text encoders, with the whole model frozen.

The token (and for num_vectors > 1 also token_1 ... token_{n-1}, diffusers' convention) is added to
each CLIP tokenizer, and a caption's token is written out as all of them (clip_tokenizers.
expand_multi_vector_tokens; diffusers' pipelines do the same to prompts, so samples match training).

The vectors are a parameter of their own, not rows of the embedding matrix: a hook on each encoder's
token embedding puts them where the new ids occur. The optimizer then holds state for the new
vectors only, and neither weight decay nor an optimizer step can move the vocabulary (diffusers'
script trains the whole matrix and copies the old rows back after every step).

CLIP pools the text at its end-of-text token. Encoders whose config keeps the pre-2023 eos_token_id
(2) find it as the highest id in the prompt, which a new token would be; they are told the
tokenizer's real end-of-text id instead (the same position for every prompt without new tokens), as
kohya's scripts do for SDXL's pooled embedding.

Files: one `.safetensors` embedding as A1111/Forge and ComfyUI load it (SD 1.x/2.x: `emb_params`,
(num_vectors, dim); SDXL: `clip_l` and `clip_g`). diffusers: `pipe.load_textual_inversion(path,
token=...)`; for SDXL once per encoder with the file's clip_l / clip_g tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from difftune.checkpoint import lora_formats as formats
from difftune.config.network_rules import EMBEDDING_ROLE, TEXTUAL_INVERSION
from difftune.errors import ConfigError
from difftune.models.base import DiffusionModel

STATE_PREFIX = EMBEDDING_ROLE + "."
"""Keys of the vectors in the resume state: `embedding.<text encoder role>`."""
BUNDLE_PREFIX = formats.BUNDLE_PREFIX
A1111_SD_KEY = "string_to_param.*"
LEGACY_EOS_ID = 2


def token_names(token: str, num_vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def embedding_file_name(token: str) -> str:
    """The embedding's file name: A1111/Forge and ComfyUI call an embedding by its file name, so it is the
    token without the characters file systems or prompts would trip on ('<sks>' -> 'sks.safetensors')."""
    stem = re.sub(r"[^\w-]", "", token) or "embedding"
    return f"{stem}.safetensors"


def supports_textual_inversion(model: DiffusionModel) -> bool:
    return bool(getattr(model, "embedding_keys", None)) and hasattr(model, "tokenizers")


class EmbeddingVectors(torch.nn.Module):
    """The trained vectors, one (num_vectors, dim) parameter per text encoder: the module the optimizer,
    the accelerator and the EMA see."""

    def __init__(self, vectors: dict[str, torch.Tensor]):
        super().__init__()
        self.vectors = torch.nn.ParameterDict({role: torch.nn.Parameter(v.detach().float().clone())
                                               for role, v in vectors.items()})


class _EncoderHooks:
    """Puts one encoder's vectors into its token embedding's output where the new ids are."""

    def __init__(self, embedding: torch.nn.Embedding, first_id: int, parameter: torch.nn.Parameter):
        self.embedding, self.first_id, self.parameter = embedding, first_id, parameter
        self._ids: torch.Tensor | None = None
        self.handles = [embedding.register_forward_pre_hook(self._before),
                        embedding.register_forward_hook(self._after)]

    def _before(self, module, args):
        ids = args[0]
        self._ids = ids
        # new ids lie past the matrix: look up row 0 for them, their vectors replace it afterwards
        return (torch.where(ids >= module.num_embeddings, torch.zeros_like(ids), ids), *args[1:])

    def _after(self, module, args, output):
        ids, self._ids = self._ids, None
        count = self.parameter.shape[0]
        new = (ids >= self.first_id) & (ids < self.first_id + count)
        rows = self.parameter.to(output.dtype)[(ids - self.first_id).clamp(0, count - 1)]
        return torch.where(new.unsqueeze(-1), rows, output)


class TextualInversion:
    """The TrainableNetwork of new token vectors (network.type = 'textual_inversion'; the vector half of
    pivotal tuning)."""

    def __init__(self, model: DiffusionModel, token: str, vectors: dict[str, torch.Tensor],
                 init_word: str = "*", config=None):
        self.model, self.token, self.init_word, self.config = model, token, init_word, config
        self.num_vectors = next(iter(vectors.values())).shape[0]
        self.names = token_names(token, self.num_vectors)
        self.module = EmbeddingVectors(vectors)
        self.notes: list[str] = []
        self._hooks: list[_EncoderHooks] = []
        for role in vectors:
            encoder, tokenizer = model.parts[role], model.tokenizers[role]
            tokenizer.add_tokens(self.names)
            ids = tokenizer.convert_tokens_to_ids(self.names)
            if ids != list(range(ids[0], ids[0] + len(ids))):
                raise RuntimeError(f"{role}: the tokenizer gave the new tokens ids {ids}, not consecutive ones")
            clip = getattr(encoder, "text_model", encoder)  # CLIPTextModelWithProjection wraps the text model
            if getattr(clip, "eos_token_id", None) == LEGACY_EOS_ID and tokenizer.eos_token_id != LEGACY_EOS_ID:
                clip.eos_token_id = tokenizer.eos_token_id  # pooled at the end-of-text token, not the highest id
            self._hooks.append(_EncoderHooks(encoder.get_input_embeddings(), ids[0], self.module.vectors[role]))

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def build(cls, model: DiffusionModel, token: str, num_vectors: int = 1, init_word: str = "*",
              vectors: dict[str, torch.Tensor] | None = None, config=None) -> TextualInversion:
        """New vectors for every text encoder of the family's embedding files, started from `init_word`'s
        token embeddings (spread over the vectors as A1111 does), or the given `vectors`."""
        check_family(model)
        if vectors is None:
            vectors = {role: initial_vectors(model, role, token, num_vectors, init_word)
                       for role in model.embedding_keys}
        else:
            for role, given in vectors.items():
                check_new_token(model.tokenizers[role], token, given.shape[0], role)
        return cls(model, token, vectors, init_word, config)

    @classmethod
    def for_training(cls, model: DiffusionModel, config) -> TextualInversion:
        network = config.network
        vectors = None
        if network.type == TEXTUAL_INVERSION and network.init_from:
            vectors = read_embedding_file(model, network.init_from, network.num_vectors)
        ti = cls.build(model, network.token, network.num_vectors, network.init_word, vectors, config)
        for module in model.parts.values():
            module.requires_grad_(False)
        ti.module.requires_grad_(True)
        return ti

    # ----------------------------------------------------------------------------- the protocol
    def param_groups(self, lrs: dict[str, float]) -> list[dict[str, Any]]:
        return [{"params": list(self.module.parameters()), "lr": lrs[EMBEDDING_ROLE], "name": EMBEDDING_ROLE}]

    def trained_roles(self) -> list[str]:
        return [EMBEDDING_ROLE]

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.module]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {STATE_PREFIX + role: p.detach() for role, p in self.module.vectors.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"training state does not match the textual inversion: has {sorted(state)[:3]}, "
                             f"expected {sorted(expected)}")
        for role, param in self.module.vectors.items():
            param.copy_(state[STATE_PREFIX + role])

    def embedding_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The embedding file's tensors: emb_params (SD 1.x/2.x), clip_l and clip_g (SDXL)."""
        return {self.model.embedding_keys[role]: p.detach().to("cpu", dtype).contiguous()
                for role, p in self.module.vectors.items()}

    def bundle_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The vectors as kohya/A1111 bundle them in a LoRA file, named by the token."""
        name = self.token
        tensors = self.embedding_tensors(dtype)
        if list(tensors) == ["emb_params"]:
            return {f"{BUNDLE_PREFIX}{name}.{A1111_SD_KEY}": tensors["emb_params"]}
        return {f"{BUNDLE_PREFIX}{name}.{key}": value for key, value in tensors.items()}

    def file_metadata(self, run: dict[str, str]) -> dict[str, str]:
        architecture = self.model.lora_metadata().get("modelspec.architecture", "")
        return {
            "modelspec.architecture": architecture.removesuffix("/lora") + "/textual-inversion",
            "modelspec.title": self.token,
            "difftune_embedding": json.dumps(self.settings()),
            **{(k if k.startswith("difftune_") else f"difftune_{k}"): str(v) for k, v in run.items()},
        }

    def settings(self) -> dict[str, Any]:
        return {"token": self.token, "num_vectors": self.num_vectors, "init_word": self.init_word,
                "tokens": self.names}

    def export(self, directory: Path, model: DiffusionModel, metadata: dict[str, str], dtype: torch.dtype) -> None:
        """`<token>.safetensors`, the embedding file A1111/Forge and ComfyUI load (and diffusers' load_textual_inversion)."""
        formats.write_lora_file(Path(directory) / embedding_file_name(self.token), self.embedding_tensors(dtype),
                                self.file_metadata(metadata), add_hash=False)

    def describe(self) -> dict[str, Any]:
        return {"type": TEXTUAL_INVERSION, "token": self.token, "num_vectors": self.num_vectors,
                "init_word": self.init_word, "trains": self.trained_roles(), "encoders": list(self.module.vectors),
                "trainable_parameters": sum(p.numel() for p in self.module.parameters())}


def token_notes(network, records) -> list[str]:
    """The token must be in the training captions (the vectors only learn where it appears): none is an
    error, some is a note naming one without it (regularisation images are meant to lack it)."""
    if network.type != TEXTUAL_INVERSION and not network.pivotal:
        return []
    own = [r for r in records if not r.is_reg]
    lacking = [r for r in own if network.token.lower() not in r.caption.lower()]  # CLIP lowercases captions
    if own and len(lacking) == len(own):
        raise ConfigError(f"network.token = '{network.token}' is in none of the {len(own)} training captions (e.g. "
                          f"{own[0].path}: {own[0].caption!r}): textual inversion trains the vectors of that word "
                          "only; write it in the captions where the concept appears (e.g. 'a photo of "
                          f"{network.token}')")
    if lacking:
        return [f"{len(lacking)} of {len(own)} training captions lack network.token '{network.token}' (e.g. "
                f"{lacking[0].path}): those images do not train its vectors"]
    return []


def check_family(model: DiffusionModel) -> None:
    if not supports_textual_inversion(model):
        raise ConfigError(f"textual inversion (network.type = 'textual_inversion' or network.pivotal) is for the CLIP "
                          f"text encoders of SD 1.x/2.x and SDXL, whose embedding files A1111/Forge and ComfyUI load; "
                          f"difftune does not train embeddings for {model.family}: train a LoRA instead")


def check_new_token(tokenizer, token: str, num_vectors: int, role: str) -> None:
    """The token and its token_i must be new words for the tokenizer: an existing word keeps its id, and
    its vector would never be trained."""
    vocab = tokenizer.get_vocab()
    for name in token_names(token, num_vectors):
        if name in vocab or f"{name}</w>" in vocab:
            raise ConfigError(f"network.token = '{token}': '{name}' is already a word of the {role} tokenizer (id "
                              f"{vocab.get(name, vocab.get(f'{name}</w>'))}); textual inversion learns a new word: "
                              f"use a made-up one such as '<{token.strip('<>')}>'")


def initial_vectors(model: DiffusionModel, role: str, token: str, num_vectors: int, init_word: str) -> torch.Tensor:
    tokenizer = model.tokenizers[role]
    check_new_token(tokenizer, token, num_vectors, role)
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise ConfigError(f"network.init_word = {init_word!r} gives no token for the {role} tokenizer; use a word")
    # A1111's spread: vector i starts from token i·len/n (repeated when the word has fewer tokens than vectors)
    weight = model.parts[role].get_input_embeddings().weight
    return weight[[ids[i * len(ids) // num_vectors] for i in range(num_vectors)]].detach().float().cpu().clone()


# ------------------------------------------------------------------------------------ from files
def read_embedding_file(model: DiffusionModel, path: str | Path, num_vectors: int | None = None,
                        name: str | None = None, tensors: dict[str, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
    """Role → (num_vectors, dim) vectors of an embedding file: A1111/ComfyUI (emb_params, clip_l/clip_g,
    string_to_param), diffusers (one key), or a LoRA file's bundle_emb keys (`name`: which bundle).
    `tensors`: the file's, when the caller has read it already."""
    check_family(model)
    if tensors is None:
        tensors, _ = formats.read_safetensors(path, "embeddings")
    tensors = embedding_entries(tensors, name, str(path))
    keys = model.embedding_keys
    if set(keys.values()) <= set(tensors):
        found = {role: tensors[key] for role, key in keys.items()}
    elif len(keys) == 1 and len(tensors) == 1:  # emb_params, string_to_param.* or a diffusers {token: tensor}
        found = {next(iter(keys)): next(iter(tensors.values()))}
    else:
        shown = sorted(tensors)[:4] + (["..."] if len(tensors) > 4 else [])
        raise formats.LoraFormatError(f"{path}: not a {model.family} embedding ({len(tensors)} tensors: "
                                      f"{', '.join(shown)}); one has {' and '.join(keys.values())}"
                                      + ("; is this a LoRA file?" if len(tensors) > 4 else ""))
    for role, vectors in found.items():
        if vectors.numel() == 0:
            raise formats.LoraFormatError(f"{path}: {keys[role]} holds no vectors (shape {tuple(vectors.shape)})")
        if not torch.isfinite(vectors).all():
            raise formats.LoraFormatError(f"{path}: {keys[role]} has NaN or infinite values: a broken embedding")
        vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.dim() != 2 else vectors
        width = model.parts[role].get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            raise formats.LoraFormatError(f"{path}: {keys[role]} has vectors of width {vectors.shape[1]}, but the "
                                          f"{role} of this model has {width}: an embedding of another model family")
        if num_vectors is not None and vectors.shape[0] != num_vectors:
            raise formats.LoraFormatError(f"{path}: {vectors.shape[0]} vectors, but network.num_vectors = {num_vectors}")
        found[role] = vectors.float()
    return found


def embedding_entries(tensors: dict[str, torch.Tensor], name: str | None, source: str) -> dict[str, torch.Tensor]:
    """An embedding file's tensors as they are, or a LoRA file's bundle under plain keys."""
    bundles = bundled_names(tensors)
    if not bundles:
        return {k.removeprefix("string_to_param."): v for k, v in tensors.items()}
    if name is None:
        if len(bundles) > 1:
            raise formats.LoraFormatError(f"{source}: the file bundles several embeddings ({', '.join(bundles)})")
        name = bundles[0]
    if name not in bundles:
        raise formats.LoraFormatError(f"{source}: no bundled embedding '{name}' (it has {', '.join(bundles)})")
    prefix = f"{BUNDLE_PREFIX}{name}."
    return {k[len(prefix):].removeprefix("string_to_param."): v for k, v in tensors.items() if k.startswith(prefix)}


def bundled_names(tensors) -> list[str]:
    return sorted({k[len(BUNDLE_PREFIX):].split(".", 1)[0] for k in tensors if k.startswith(BUNDLE_PREFIX)})


def file_token(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The word an embedding file answers to: the token difftune trained it with (its metadata), a diffusers
    file's single key (learned_embeds: {"<cat>": ...}), else the file name, as A1111 and ComfyUI call it."""
    if "difftune_embedding" in metadata:
        return json.loads(metadata["difftune_embedding"])["token"]
    if len(tensors) == 1:
        key = next(iter(tensors))
        if key not in ("emb_params", "clip_l", "clip_g") and not key.startswith(("string_to_param", BUNDLE_PREFIX)):
            return key
    return Path(path).stem


def load_embedding_file(model: DiffusionModel, path: str | Path, token: str | None = None) -> TextualInversion:
    """Put an embedding file's vectors on `model` for sampling, under `token` (default: file_token)."""
    tensors, metadata = formats.read_safetensors(path, "embeddings")
    token = token or file_token(path, tensors, metadata)
    check_not_loaded(model, token, str(path))
    ti = TextualInversion.build(model, token, vectors=read_embedding_file(model, path, tensors=tensors))
    ti.module.requires_grad_(False)
    return ti


def check_not_loaded(model: DiffusionModel, token: str, source: str) -> None:
    """Two embeddings under one word: the second would be refused as 'already a word'; say what happened."""
    for tokenizer in getattr(model, "tokenizers", {}).values():
        added = {t.lower() for t in (getattr(tokenizer, "added_tokens_encoder", None) or {})}
        if token.lower() in added:
            raise formats.LoraFormatError(f"{source}: an embedding for '{token}' is loaded already (the --lora file's "
                                          "bundled one, or another --embedding): load each once")


def load_bundled_embeddings(model: DiffusionModel, lora_path: str | Path) -> list[TextualInversion]:
    """The embeddings a LoRA file carries (bundle_emb keys, pivotal tuning), each under its bundle name."""
    bundle = formats.read_bundle(lora_path)
    if bundle and not supports_textual_inversion(model):
        raise formats.LoraFormatError(f"{lora_path}: bundles textual-inversion embeddings, which {model.family} "
                                      "cannot use")
    loaded = []
    for name in bundled_names(bundle):
        check_not_loaded(model, name, str(lora_path))
        ti = TextualInversion.build(model, name, vectors=read_embedding_file(model, lora_path, name=name,
                                                                             tensors=bundle))
        ti.module.requires_grad_(False)
        loaded.append(ti)
    return loaded


def missing_bundle_note(lora_path: str | Path) -> str | None:
    """A pivotal LoRA without its bundle (the diffusers layout, a converted copy): the vectors are in the
    embedding file written next to it."""
    keys, metadata = formats.read_header(lora_path)
    if "difftune_embedding" not in metadata or any(k.startswith(BUNDLE_PREFIX) for k in keys):
        return None
    token = json.loads(metadata["difftune_embedding"])["token"]
    return (f"{lora_path} was trained with the embedding '{token}' (pivotal tuning), which this file does not carry: "
            f"add --embedding {Path(lora_path).parent / embedding_file_name(token)}")
