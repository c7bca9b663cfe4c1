"""Multi-source data: examples and splits, the embedded synthetic tasks, tokenizer, batching.

Importing ``jaxgrad.data`` pulls in numpy only: ``datasets`` (file loaders) and ``tokenizers`` /
``transformers`` (the character tokenizer) are imported inside the functions that use them.
"""

from jaxgrad.config import FORMATS
from jaxgrad.data.batching import (
    EncodedExamples,
    SpecialIds,
    batch_iterator,
    bucket_length,
    collate,
    encode_examples,
    encode_texts,
    length_buckets,
    num_batches,
    sequence_lengths,
    special_ids,
)
from jaxgrad.data.examples import (
    ANSWER_FORMATS,
    SPLITS,
    example_id,
    extract_cot_answer,
    extract_leading_answer,
    extract_marker_answer,
    make_examples,
)
from jaxgrad.data.multisource import MultiSourceData
from jaxgrad.data.sources import SourcesSpec, load_data, load_sources, read_examples
from jaxgrad.data.synthetic import (
    KINDS,
    TASKS,
    SyntheticSpec,
    generic_text,
    source_kinds,
    synthetic_sources,
)
from jaxgrad.data.tokenizer import build_char_tokenizer, save_char_tokenizer

__all__ = [
    "ANSWER_FORMATS", "EncodedExamples", "FORMATS", "KINDS", "MultiSourceData", "SPLITS",
    "SourcesSpec", "SpecialIds", "SyntheticSpec", "TASKS", "batch_iterator", "bucket_length",
    "build_char_tokenizer", "collate", "encode_examples", "encode_texts", "example_id",
    "extract_cot_answer", "extract_leading_answer", "extract_marker_answer", "generic_text", "length_buckets",
    "load_data", "load_sources", "make_examples", "num_batches", "read_examples", "save_char_tokenizer",
    "sequence_lengths", "source_kinds", "special_ids", "synthetic_sources",
]
