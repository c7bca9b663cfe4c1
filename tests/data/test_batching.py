"""jaxgrad.data.batching: the decoder and encoder-decoder layouts by hand, target masks,
truncation, special ids, and the iteration: length buckets, epochs, order by seed, resuming and
process shards."""

from __future__ import annotations

import numpy as np
import pytest

from jaxgrad.data import batching as B
from jaxgrad.data.examples import make_examples
from jaxgrad.data.synthetic import generic_text


def _ids(tok, text):
    return [tok.convert_tokens_to_ids(c) for c in text]


# ----------------------------------------------------------------------------------------------
# Layout.


def test_decoder_layout_hand_example(tok):
    exs = make_examples([("s", "ab", "c", None), ("t", "", "de", None)])
    enc = B.encode_examples(exs, tok, sources=["t", "s"])
    batch = B.collate(enc, [0, 1], max_length=8, batch_size=3, buckets=(4, 8))
    a, b, c, d, e = _ids(tok, "abcde")
    np.testing.assert_array_equal(batch["input_ids"], [[1, a, b, c, 2, 0, 0, 0],
                                                       [1, d, e, 2, 0, 0, 0, 0],
                                                       [0] * 8])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 1, 0, 0, 0],
                                                            [1, 1, 1, 1, 0, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(batch["targets"], [[a, b, c, 2, 0, 0, 0, 0],
                                                     [d, e, 2, 0, 0, 0, 0, 0], [0] * 8])
    # Row 0: positions 2 (predicts c) and 3 (predicts eos); row 1: every completion token.
    np.testing.assert_array_equal(batch["target_mask"], [[0, 0, 1, 1, 0, 0, 0, 0],
                                                         [1, 1, 1, 0, 0, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(batch["example_index"], [0, 1, -1])
    np.testing.assert_array_equal(batch["source_index"], [1, 0, -1])
    np.testing.assert_array_equal(batch["valid"], [1, 1, 0])
    assert {k: v.dtype for k, v in batch.items()} == {
        "input_ids": np.int32, "attention_mask": np.int32, "targets": np.int32,
        "target_mask": np.float32, "example_index": np.int32, "source_index": np.int32,
        "valid": np.float32}


def test_encoder_decoder_layout_hand_example(tok):
    enc = B.encode_examples(make_examples([("s", "ab", "cd", None)]), tok, decoder_start_id=9)
    batch = B.collate(enc, [0], max_length=8, arch="encoder_decoder", buckets=(4, 8))
    a, b, c, d = _ids(tok, "abcd")
    np.testing.assert_array_equal(batch["input_ids"], [[a, b, 2, 0]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["decoder_input_ids"], [[9, c, d, 0]],
                                  "the decoder starts with decoder_start_id, not pad")
    np.testing.assert_array_equal(batch["decoder_attention_mask"], [[1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["targets"], [[c, d, 2, 0]])
    np.testing.assert_array_equal(batch["target_mask"], [[1, 1, 1, 0]])


@pytest.mark.parametrize("arch", B.ARCHS)
def test_target_mask_selects_exactly_completion_and_eos(tok, data, arch):
    exs = data.examples("train")
    batch = next(B.batch_iterator(exs, tok, batch_size=len(exs), max_length=48, shuffle=False,
                                  arch=arch, decoder_start_id=START))
    for r, i in enumerate(batch["example_index"]):
        picked = batch["targets"][r][batch["target_mask"][r] > 0].tolist()
        assert picked == _ids(tok, exs[i]["completion"]) + [2], f"row {r}: {exs[i]}"
        if arch == "decoder":
            n = int(batch["attention_mask"][r].sum())
            assert tok.decode(batch["input_ids"][r][1:n - 1]) == \
                exs[i]["prompt"] + exs[i]["completion"]
            np.testing.assert_array_equal(batch["targets"][r][:n - 1],
                                          batch["input_ids"][r][1:n], "targets[t] != ids[t+1]")


def test_truncation_keeps_the_completion(tok):
    exs = make_examples([("s", "abcdefgh", "xyz", None), ("s", "ab", "uvwxyz", None)])
    enc = B.encode_examples(exs, tok, decoder_start_id=START)
    batch = B.collate(enc, [0, 1], max_length=7, buckets=(7,))
    assert tok.decode(batch["input_ids"][0]) == "<s>ghxyz</s>", "prompt cut from the left"
    # The completion alone (6 + bos + eos = 8) does not fit: prompt dropped, completion cut on
    # the right, no eos (the model must not learn to stop early).
    assert tok.decode(batch["input_ids"][1]) == "<s>uvwxyz"
    np.testing.assert_array_equal(batch["target_mask"][1], [1, 1, 1, 1, 1, 1, 0])
    s2s = B.collate(enc, [0, 1], max_length=4, arch="encoder_decoder", buckets=(4,))
    assert tok.decode(s2s["input_ids"][0]) == "fgh</s>"
    assert tok.decode(s2s["targets"][0]) == "xyz</s>"
    assert tok.decode(s2s["targets"][1]) == "uvwx", "too long: cut, no eos"
    assert s2s["target_mask"].sum() == 8


def test_subword_tokenizer_and_missing_bos_fallback():
    """A BPE tokenizer without bos (like T5): bos falls back to eos, masks follow real tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"])
    corpus = ["the answer is forty two", "question what is the answer", "forty forty two"] * 20
    core.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                  unk_token="<unk>")
    sp = B.special_ids(tok)
    assert tok.bos_token_id is None and sp.bos == sp.eos == 1 and sp.pad == 0
    exs = make_examples([("q", "question what is", "the answer", None)])
    enc = B.encode_examples(exs, tok)
    batch = B.collate(enc, [0], max_length=16, buckets=(16,))
    picked = batch["targets"][0][batch["target_mask"][0] > 0]
    assert tok.decode(picked[:-1]) == tok.decode(tok("the answer")["input_ids"])
    assert picked[-1] == 1 and batch["input_ids"][0, 0] == 1, "eos stands in for the missing bos"


def test_special_ids_fallbacks_and_errors():
    class NoPad:
        eos_token_id, bos_token_id, pad_token_id = 7, 5, None

    class NoEos:
        eos_token_id, bos_token_id, pad_token_id = None, 5, 0

    assert B.special_ids(NoPad(), decoder_start_id=9) == B.SpecialIds(pad=7, bos=5, eos=7,
                                                                      decoder_start=9)
    with pytest.raises(ValueError, match="no eos token"):
        B.special_ids(NoEos())


# ----------------------------------------------------------------------------------------------
# Iteration.


START = 9  # an encoder-decoder start token distinct from pad (0), as MADLAD-400's is


def _epoch(exs, tok, **kw):
    kw = {"batch_size": 16, "max_length": 48, "seed": 3, "epoch": 0, **kw}
    if kw.get("arch") == "encoder_decoder" and not isinstance(exs, B.EncodedExamples):
        kw.setdefault("decoder_start_id", START)
    return list(B.batch_iterator(exs, tok, **kw))


def _assert_batches_equal(got, want, what):
    assert len(got) == len(want), f"{what}: {len(got)} batches, expected {len(want)}"
    for s, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys()
        for k in g:
            np.testing.assert_array_equal(g[k], w[k], f"{what}: batch {s} field {k} differs")


def test_bucket_shapes_are_limited(tok):
    lines = generic_text(300, seed=0, max_chars=40)
    exs = make_examples(("g", "", t, None) for t in lines)
    buckets = B.length_buckets(48)
    assert buckets == (16, 32, 48)
    batches = _epoch(exs, tok, batch_size=8)
    shapes = {b["input_ids"].shape for b in batches}
    assert {s[0] for s in shapes} == {8}, "batch size must be fixed, last batch included"
    assert {s[1] for s in shapes} <= set(buckets) and len(shapes) <= len(buckets), shapes
    for b in batches:
        longest = int(b["attention_mask"].sum(1).max())
        assert b["input_ids"].shape[1] == B.bucket_length(longest, buckets), \
            "length must be the smallest bucket holding the longest row"


def test_epoch_covers_each_example_once_and_pads_last_batch(tok, data):
    exs = data.examples("train")  # 230 examples: 14 full batches of 16 and one of 6
    batches = _epoch(exs, tok)
    seen = np.concatenate([b["example_index"][b["valid"] > 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(len(exs))), "each example exactly once per epoch"
    last = batches[-1]
    np.testing.assert_array_equal(last["valid"], [1] * 6 + [0] * 10)
    assert (last["example_index"][6:] == -1).all() and last["target_mask"][6:].sum() == 0
    assert (last["attention_mask"][6:] == 0).all()
    for names, bs in ((sorted(data.sources), batches),
                      (data.sources, _epoch(exs, tok, sources=data.sources))):
        for b in bs:
            for i, s in zip(b["example_index"], b["source_index"]):
                if i >= 0:
                    assert names[s] == exs[i]["source"], f"source_index must index {names}"
    assert len(_epoch(exs, tok, drop_remainder=True)) == 14 == B.num_batches(230, 16, True)


def test_order_is_fixed_by_seed_and_epoch(tok, data):
    exs = data.examples("train")
    first = _epoch(exs, tok)
    _assert_batches_equal(_epoch(exs, tok), first, "same (seed, epoch)")
    order = lambda bs: np.concatenate([b["example_index"] for b in bs]).tolist()  # noqa: E731
    assert order(_epoch(exs, tok, epoch=1)) != order(first), "epoch must change the order"
    assert order(_epoch(exs, tok, seed=4)) != order(first), "seed must change the order"
    assert order(_epoch(exs, tok, shuffle=False))[:230] == list(range(230))


@pytest.mark.parametrize("arch", B.ARCHS)
def test_resume_from_step_reproduces_the_tail(tok, data, arch):
    exs = data.examples("train")
    full = _epoch(exs, tok, arch=arch, epoch=2)
    for k in (1, 7, len(full) - 1, len(full)):
        _assert_batches_equal(_epoch(exs, tok, arch=arch, epoch=2, start_step=k), full[k:],
                              f"resume at step {k}")
    encoded = B.encode_examples(exs, tok, decoder_start_id=START)
    _assert_batches_equal(_epoch(encoded, None, arch=arch, epoch=2, start_step=3), full[3:],
                          "pre-encoded examples")


@pytest.mark.parametrize("arch", B.ARCHS)
def test_process_shards_partition_the_global_batch(tok, data, arch):
    exs = data.examples("train")
    whole = _epoch(exs, tok, arch=arch)
    shards = [_epoch(exs, tok, arch=arch, process_index=p, process_count=4) for p in range(4)]
    for step, global_batch in enumerate(whole):
        for key, value in global_batch.items():
            parts = [shards[p][step][key] for p in range(4)]
            assert all(part.shape[0] == 4 for part in parts), "each process gets B / P rows"
            np.testing.assert_array_equal(np.concatenate(parts), value,
                                          f"step {step}: shards of {key} != the global batch")


def test_bad_arguments_fail_clearly(tok, data):
    exs = data.examples("train")
    with pytest.raises(ValueError, match="divisible by process_count=3"):
        _epoch(exs, tok, process_count=3)
    with pytest.raises(ValueError, match="process_index=2 must be < process_count=2"):
        _epoch(exs, tok, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="start_step=16 is past the end"):
        _epoch(exs, tok, start_step=16)
    with pytest.raises(ValueError, match="ending at max_length=48"):
        _epoch(exs, tok, buckets=(16, 64))
    with pytest.raises(ValueError, match="arch 'encoder'"):
        _epoch(exs, tok, arch="encoder")
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        _epoch(exs, tok, max_length=1)
    with pytest.raises(ValueError, match="lacks keys \\['completion'\\]"):
        _epoch([{"prompt": "a", "source": "s"}], tok)
    with pytest.raises(ValueError, match="not in sources=\\['x'\\]"):
        _epoch(exs, tok, sources=["x"])
    with pytest.raises(ValueError, match="tokenizer is required"):
        _epoch(exs, None)


def test_encoder_decoder_batches_need_the_models_start_token(tok):
    """No silent fallback to pad: an encoder-decoder batch needs the decoder start id (which
    jaxgrad.models.forward.model_layout reads from the model: tests/models/test_forward.py)."""
    enc = B.encode_examples(make_examples([("s", "ab", "cd", None)]), tok)
    with pytest.raises(ValueError, match="decoder_start_id"):
        B.collate(enc, [0], max_length=8, arch="encoder_decoder")
    batch = B.collate(enc, [0], max_length=8, arch="decoder")  # decoders have no decoder start
    assert "decoder_input_ids" not in batch

