"""jaxgrad.data.tokenizer: the character tokenizer round-trips text and loads with AutoTokenizer."""

from __future__ import annotations

import json

import pytest

from jaxgrad.data.synthetic import generic_text
from jaxgrad.data.tokenizer import DEFAULT_CHARSET, build_char_tokenizer, save_char_tokenizer


def test_char_tokenizer_round_trips_and_loads_with_autotokenizer(tok, data, tmp_path):
    from transformers import AutoTokenizer

    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(DEFAULT_CHARSET)
    texts = [e["prompt"] + e["completion"] for e in data.examples("train")] + generic_text(50)
    texts.append("two  spaces\nand a newline")
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(t), f"one token per character expected for {t!r}"
        assert ids == [4 + DEFAULT_CHARSET.index(c) for c in t], t
        assert tok.decode(ids) == t, f"decode(encode({t!r})) differs"
    assert tok("a\u00e9", add_special_tokens=False)["input_ids"][1] == tok.unk_token_id
    save_char_tokenizer(str(tmp_path / "tok"))
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast", "a class transformers 4 knows"
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    for t in texts[:20]:
        assert loaded(t, add_special_tokens=False)["input_ids"] == \
            tok(t, add_special_tokens=False)["input_ids"], "saved tokenizer encodes differently"
    with pytest.raises(ValueError, match="repeats characters \\['a'\\]"):
        build_char_tokenizer("abca")
