"""jaxgrad.models.forward: the model's batch layout (model_layout: encoder-decoder or decoder,
and the decoder start token read from the model's config, never a silent pad) and the encoding
that uses it (encode_for_model)."""

from __future__ import annotations

import pytest

from jaxgrad.data import batching as B
from jaxgrad.data.examples import make_examples
from jaxgrad.data.tokenizer import build_char_tokenizer
from jaxgrad.models.forward import encode_for_model, model_layout


class _Cfg:
    decoder_start_token_id = 7


class _Seq2Seq:
    is_encoder_decoder = True

    def __init__(self, start=7):
        self.config = _Cfg()
        self.config.decoder_start_token_id = start


class _Causal:
    is_encoder_decoder = False


def test_model_layout_reads_the_decoder_start_from_the_model():
    assert model_layout(_Seq2Seq()) == ("encoder_decoder", 7)
    assert model_layout(_Causal()) == ("decoder", None)
    with pytest.raises(ValueError, match="decoder_start_token_id is None"):
        model_layout(_Seq2Seq(start=None))


def test_encode_for_model_batches_start_with_the_models_decoder_start():
    encoded, arch = encode_for_model(make_examples([("s", "ab", "cd", None)]),
                                     build_char_tokenizer(), _Seq2Seq())
    assert arch == "encoder_decoder"
    batch = B.collate(encoded, [0], max_length=8, arch=arch)
    assert batch["decoder_input_ids"][0, 0] == 7
