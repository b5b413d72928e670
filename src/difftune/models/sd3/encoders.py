"""SD3's text encoders and their tokenizers from folders: a diffusers SD3 folder's `text_encoder*/`, or
a transformers model folder given as `model.text_encoder_path` / `text_encoder_2_path` /
`text_encoder_3_path`."""

from __future__ import annotations

from pathlib import Path

from difftune.errors import ModelLoadError

TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def load_encoder_folder(folder: Path, role: str, config, what: str) -> dict:
    """{role: encoder, its tokenizer role: tokenizer} from a pipeline folder (its `role/` subfolder) or
    a model folder (config.json at the top)."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from difftune.models.sd import weights_variant

    sub = role if (folder / role).is_dir() else ""
    cls = T5EncoderModel if role == "text_encoder_3" else CLIPTextModelWithProjection
    try:
        encoder = cls.from_pretrained(folder, subfolder=sub, **weights_variant(folder / sub))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{what} = '{folder}': could not load the {cls.__name__}: {e}") from e
    if role == "text_encoder_3":
        return {role: encoder, TOKENIZERS[role]: t5_tokenizer_for(encoder, folder, config, what)}
    return {role: encoder, TOKENIZERS[role]: _clip_tokenizer(folder, encoder, TOKENIZERS[role])}


def _clip_tokenizer(folder: Path, encoder, subfolder: str):
    from transformers import CLIPTokenizer

    from difftune.models.sd.single_file import tokenizer_for

    if (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return tokenizer_for(encoder, folder, subfolder)  # the folder's tokenizer*/ or the built-in CLIP BPE


def t5_tokenizer_for(encoder, folder: Path, config, what: str):
    """The T5 tokenizer next to the weights (`tokenizer_3/` or the folder itself), else model.tokenizer_path;
    the tiny models' character-level one is rebuilt (transformers' T5 tokenizer cannot read it back)."""
    from difftune.models.sd3.adapter import MAX_SEQUENCE_LENGTH
    from difftune.models.t5_text import TINY_T5_CHARS, TINY_T5_SPECIALS, load_t5_tokenizer, tiny_t5_tokenizer

    if encoder.config.vocab_size == len(TINY_T5_SPECIALS) + len(TINY_T5_CHARS):
        return tiny_t5_tokenizer(MAX_SEQUENCE_LENGTH)
    for candidate in (folder / "tokenizer_3", folder):
        if any((candidate / name).is_file() for name in T5_TOKENIZER_FILES):
            return load_t5_tokenizer(candidate, what)
    return load_t5_tokenizer(Path(config.tokenizer_path).expanduser() if config.tokenizer_path else None, what)
