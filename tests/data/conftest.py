"""Fixtures of the data tests: the character tokenizer and a small synthetic multi-source
dataset (built once per test module)."""

import pytest

from jaxgrad.data.synthetic import SyntheticSpec, synthetic_sources
from jaxgrad.data.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def data():
    return synthetic_sources(SyntheticSpec(n_train=23, n_validation=2, n_test=2))
