"""T5 text encoding, shared by the flow-matching families (Flux.1's and SD3's T5-XXL), and its tiny
offline stand-in.

The real T5 tokenizer is a SentencePiece model (`spiece.model`) or its `tokenizer.json`; nothing in
the installed packages ships it, so a T5 given as a single file needs `model.tokenizer_path`.
`tiny_t5_tokenizer` is a character-level T5 tokenizer generated here (no hub, no file), for the
built-in tiny models.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from difftune.errors import ModelLoadError

TINY_T5_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,;:!?'\"-_()/&+#%*=<>[]{}"
TINY_T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def tiny_t5_tokenizer(max_length: int = 64):
    """A T5TokenizerFast over single characters: pad 0, eos 1, unk 2, then one id per character."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = {token: i for i, token in enumerate((*TINY_T5_SPECIALS, *TINY_T5_CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           model_max_length=max_length, extra_ids=0)


def tiny_t5_encoder(width: int = 32, layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(TINY_T5_SPECIALS) + len(TINY_T5_CHARS), d_model=width, d_kv=8, d_ff=2 * width,
                      num_layers=layers, num_heads=4, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                      is_gated_act=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config)


def encode_t5(encoder, tokenizer, captions: list[str], max_length: int) -> torch.Tensor:
    """Last hidden states of T5 over captions padded to max_length (as the Flux and SD3 pipelines do)."""
    ids = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(encoder.device), output_hidden_states=False)[0]


def load_t5_tokenizer(folder: Path | None, what: str):
    """The T5 tokenizer from a folder holding spiece.model or tokenizer.json; a clear error otherwise."""
    from transformers import T5TokenizerFast

    if folder is None:
        raise ModelLoadError(
            f"{what}: the T5 tokenizer cannot be built offline; set model.tokenizer_path to a folder holding "
            "its spiece.model or tokenizer.json (e.g. the tokenizer_2 folder of a diffusers Flux download, "
            "or the folder of google/t5-v1_1-xxl)")
    names = ("tokenizer.json", "spiece.model")
    if not any((folder / n).is_file() for n in names):
        raise ModelLoadError(f"model.tokenizer_path = '{folder}': has neither {' nor '.join(names)} (a T5 "
                             "tokenizer needs one of them)")
    from transformers import PreTrainedTokenizerFast

    try:
        try:
            return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
        except TypeError:
            # transformers 5 rebuilds only Unigram vocabularies as T5TokenizerFast; a saved tiny (WordLevel)
            # tokenizer loads as the generic fast tokenizer it is.
            return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, ImportError, TypeError) as e:
        raise ModelLoadError(f"model.tokenizer_path = '{folder}': not a loadable T5 tokenizer ({e})") from None
