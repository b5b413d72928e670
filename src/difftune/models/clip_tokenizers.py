"""CLIP tokenizers built offline.

- `byte_level_clip_tokenizer`: a tiny byte-level vocabulary (514 tokens, no merges) for the built-in
  tiny models; it tokenizes any text the way CLIP's BPE does before merges.
- `openai_clip_tokenizer`: the real CLIP BPE (SD1.x, and the OpenCLIP encoders of SD2.x/SDXL),
  rebuilt from `bpe_simple_vocab_16e6.txt.gz`, which ships inside the `open_clip_torch` wheel. We
  locate that file without importing open_clip (whose import pulls torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def _base_vocab() -> list[str]:
    chars = list(_byte_to_unicode().values())
    return chars + [c + "</w>" for c in chars]


def byte_level_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    vocab = [*_base_vocab(), BOS, EOS]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=max_length)


BYTE_LEVEL_VOCAB_SIZE = 2 * 256 + 2


def find_clip_bpe_file() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate
    return None


def openai_clip_tokenizer(max_length: int = 77, pad_token: str = EOS) -> CLIPTokenizer:
    """The 49408-token CLIP tokenizer. SD2.x's OpenCLIP uses the same vocabulary, padded with "!"."""
    path = find_clip_bpe_file()
    if path is None:
        raise FileNotFoundError(
            "the CLIP BPE vocabulary was not found: install it with `pip install --no-deps open_clip_torch` "
            "(it ships bpe_simple_vocab_16e6.txt.gz), or load the model from a diffusers folder that has tokenizer/"
        )
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    # The file's first line is a header; CLIP uses the first 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = _base_vocab() + ["".join(pair) for pair in merges] + [BOS, EOS]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=merges,
        model_max_length=max_length,
        pad_token=pad_token,
    )


def expand_multi_vector_tokens(tokenizer, captions: list[str]) -> list[str]:
    """Captions with each multi-vector textual-inversion token written out as all its tokens: "<sks>"
    becomes "<sks> <sks>_1 <sks>_2" when the tokenizer has those added tokens (diffusers' convention, which
    its pipelines apply to prompts the same way), so training, validation and samples read one text."""
    added = getattr(tokenizer, "added_tokens_encoder", None) or {}
    groups = {}
    for token in added:
        if f"{token}_1" in added:
            names, i = [token], 1
            while f"{token}_{i}" in added:
                names.append(f"{token}_{i}")
                i += 1
            groups[token] = " ".join(names)
    if not groups:
        return captions
    out = []
    for caption in captions:
        for token, expanded in groups.items():
            # CLIP lowercases text before it finds added tokens: "<SKS>" is the token "<sks>" too
            caption = re.sub(re.escape(token) + r"(?!_\d)", lambda _m, e=expanded: e, caption, flags=re.IGNORECASE)
        out.append(caption)
    return out
