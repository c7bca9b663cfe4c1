"""A character-level tokenizer in Hugging Face format, for the synthetic tasks and tiny models.

One token per character of ``charset`` after four specials: ``<pad>`` = 0, ``<s>`` (bos) = 1,
``</s>`` (eos) = 2, ``<unk>`` = 3; any other character becomes ``<unk>``. It is built with the
``tokenizers`` library (a ``WordLevel`` model over single characters, a pre-tokenizer that
isolates every character, a ``Fuse`` decoder so decoding joins characters without spaces) and
wrapped in ``transformers.PreTrainedTokenizerFast``, so ``save_pretrained(dir)`` writes
``tokenizer.json`` + ``tokenizer_config.json`` and ``AutoTokenizer.from_pretrained(dir)`` loads it
offline (``tokenizer_class`` is written as ``PreTrainedTokenizerFast``, a name transformers 4 and 5
both know). No post-processor: the tokenizer adds no special tokens itself; the batching code adds
bos / eos by id.

Pad is 0 so that it doubles as T5's decoder start token. ``tokenizers`` and ``transformers`` are
imported inside the functions.
"""

from __future__ import annotations

import json
import os
import string

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# Digits, letters, ASCII punctuation, space and newline: covers the synthetic tasks and
# generic_text (96 characters, vocabulary size 100).
DEFAULT_CHARSET = string.digits + string.ascii_lowercase + string.ascii_uppercase + \
    string.punctuation + " \n"


def build_char_tokenizer(charset: str = DEFAULT_CHARSET):
    """A ``transformers.PreTrainedTokenizerFast`` with one token per character of ``charset``.

    Args:
      charset: the characters, each once; ids follow this order after the four specials.

    Returns:
      The tokenizer, with ``pad_token_id == 0``, ``bos_token_id == 1``, ``eos_token_id == 2``,
      ``unk_token_id == 3``.
    """
    if not isinstance(charset, str) or not charset:
        raise ValueError(f"charset must be a non-empty string, got {charset!r}")
    repeated = sorted({c for c in charset if charset.count(c) > 1})
    if repeated:
        raise ValueError(f"charset repeats characters {repeated}")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(charset))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # (?m) lets "." match newlines in Oniguruma, so every character is its own piece.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>",
                                   model_max_length=1 << 16)


def save_char_tokenizer(directory: str, charset: str = DEFAULT_CHARSET):
    """Builds the character tokenizer and saves it to ``directory`` in Hugging Face format.

    ``tokenizer_config.json`` names ``PreTrainedTokenizerFast``, so transformers 4 and 5 load it.

    Args:
      directory: the output directory (``save_pretrained``'s).
      charset: the characters of the vocabulary (:func:`build_char_tokenizer`).

    Returns:
      The tokenizer that was saved.
    """
    tokenizer = build_char_tokenizer(charset)
    tokenizer.save_pretrained(directory)
    # transformers 5 writes its own class name ("TokenizersBackend"), unknown to transformers 4;
    # "PreTrainedTokenizerFast" names the same class in both.
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return tokenizer
