"""jaxgrad.train.generation against torch transformers: greedy decoding, the encoder-decoder start
token (issue 12, kind 6) and the padding side (kind 7), and the default answer extraction.

Kind 6: a T5 whose ``decoder_start_token_id`` is not its pad id (MADLAD-400's is not): greedy
generation starts the decoder with it, as transformers' ``generate`` does.

Kind 7: ``jaxgrad.train.generate`` on left-padded prompts (transformers' generation layout) gives
each row what the prompt gives alone, and what transformers' ``generate`` gives; masks that are
not a padding layout are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch  # the test extra installs torch (CPU) and transformers: references, never skipped
import transformers
from flax import nnx

from helpers import fixture
from helpers.models import START, START_EXAMPLES
from helpers.training import tiny_model
from jaxgrad.train import default_extract_answer, generate


def test_t5_generation_starts_like_transformers(t5_start7):
    from jaxgrad.models import load_pretrained
    from jaxgrad.train import generate

    d, m = t5_start7
    model, tokenizer = load_pretrained(d)
    ids = [tokenizer(e["prompt"], add_special_tokens=False)["input_ids"] + [2]
           for e in START_EXAMPLES]
    L = max(map(len, ids))
    batch = np.zeros((len(ids), L), np.int32)
    mask = np.zeros((len(ids), L), np.int32)
    for r, x in enumerate(ids):
        batch[r, :len(x)], mask[r, :len(x)] = x, 1
    got = np.asarray(generate(model, batch, mask, max_new_tokens=5, eos_id=2, pad_id=0))
    with torch.no_grad():
        ref = m.generate(input_ids=torch.tensor(batch, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=5,
                         min_new_tokens=5, do_sample=False, num_beams=1).numpy()
    assert (ref[:, 0] == START).all(), "transformers starts the decoder with decoder_start_token_id"
    np.testing.assert_array_equal(got, ref[:, 1:6], "greedy tokens vs transformers.generate")


@pytest.fixture(scope="module")
def llama():
    from jaxgrad.models import load_pretrained

    model, _ = load_pretrained(fixture("tiny-llama"), with_tokenizer=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(fixture("tiny-llama")).eval()
    return model, ref


PROMPTS = [[1, 20, 30, 40, 50, 60, 7], [1, 25, 35], [1, 44], [1, 9, 9, 9, 9]]


def _padded(prompts, side, pad=2):
    L = max(map(len, prompts))
    ids = np.full((len(prompts), L), pad, np.int32)
    mask = np.zeros((len(prompts), L), np.int32)
    for i, p in enumerate(prompts):
        sl = slice(0, len(p)) if side == "right" else slice(L - len(p), L)
        ids[i, sl], mask[i, sl] = p, 1
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_generate_any_padding_side_equals_each_prompt_alone(llama, side):
    from jaxgrad.train import generate

    model, _ = llama
    alone = [np.asarray(generate(model, np.array([p], np.int32), np.ones((1, len(p)), np.int32),
                                 max_new_tokens=6, eos_id=2, pad_id=2))[0].tolist() for p in PROMPTS]
    ids, mask = _padded(PROMPTS, side)
    got = np.asarray(generate(model, ids, mask, max_new_tokens=6, eos_id=2, pad_id=2)).tolist()
    assert got == alone, f"{side}-padded batch differs from each prompt generated alone"


def test_generate_left_padded_matches_transformers(llama):
    from jaxgrad.train import generate

    model, ref = llama
    ids, mask = _padded(PROMPTS, "left", pad=0)
    got = np.asarray(generate(model, ids, mask, max_new_tokens=6, eos_id=10_000, pad_id=0))
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                            attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=6,
                            do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(got, want[:, ids.shape[1]:].numpy(),
                                  "left-padded greedy tokens vs transformers.generate")


@pytest.mark.parametrize("row,what", [([1, 0, 1, 1], "2 separate runs"),
                                      ([1, 0, 1, 0], "2 separate runs")])
def test_generate_refuses_masks_that_are_not_padding(llama, row, what):
    from jaxgrad.train import generate

    model, _ = llama
    ids = np.ones((2, 4), np.int32)
    mask = np.array([[1, 1, 1, 1], row], np.int32)
    with pytest.raises(ValueError, match=f"row 1 has {what}"):
        generate(model, ids, mask, max_new_tokens=2, eos_id=2)


def test_generate_accepts_the_filler_rows_of_a_fixed_size_batch(llama):
    """Evaluation batches are padded to a fixed size with all-zero rows (valid = 0)."""
    from jaxgrad.train import generate

    model, _ = llama
    ids, mask = _padded(PROMPTS[:2], "left")
    alone = np.asarray(generate(model, ids, mask, max_new_tokens=4, eos_id=2, pad_id=2))
    ids = np.concatenate([ids, np.full((2, ids.shape[1]), 2, np.int32)])
    mask = np.concatenate([mask, np.zeros((2, mask.shape[1]), np.int32)])
    got = np.asarray(generate(model, ids, mask, max_new_tokens=4, eos_id=2, pad_id=2))
    np.testing.assert_array_equal(got[:2], alone)
    np.testing.assert_array_equal(got[2:], 2, "filler rows get pad_id throughout")


def test_generate_stops_when_every_row_is_done_with_the_same_tokens(llama):
    """The loop ends once every row has emitted eos; the result equals the full-length run with
    each row cut after its first eos (what running every step would give)."""
    from jaxgrad.train import generate

    model, _ = llama
    ids, mask = _padded(PROMPTS, "right", pad=0)
    free = np.asarray(generate(model, ids, mask, max_new_tokens=8, eos_id=-1, pad_id=0))
    eos = int(free[0, 1])  # the second token of row 0: row 0 stops after 2 tokens
    want = free.copy()
    for row in want:
        hit = np.flatnonzero(row == eos)
        if hit.size:
            row[hit[0] + 1:] = 0
    got = np.asarray(generate(model, ids, mask, max_new_tokens=8, eos_id=eos, pad_id=0))
    np.testing.assert_array_equal(got, want, "early stop changed the generated tokens")


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generate_is_greedy(family):
    """Every generated token is the argmax of a teacher-forced forward pass over the prompt and
    the tokens generated before it (the definition of greedy decoding), for prompts of different
    lengths batched together, up to and including eos; pad after eos."""
    model, tok = tiny_model(family, seed=3)
    prompts = ["12+3=", "copy ab>", "7+88="]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids = [[tok.bos_token_id] + x if family == "llama" else x + [tok.eos_token_id] for x in ids]
    n, eos = 6, tok.eos_token_id
    input_ids, mask = right_pad(ids)
    got = np.asarray(generate(model, input_ids, mask, max_new_tokens=n, eos_id=eos))
    assert got.shape == (3, n)
    gens = []
    for row in got.tolist():
        k = row.index(eos) + 1 if eos in row else n
        assert row[k:] == [0] * (n - k), f"tokens after eos are not pad: {row}"
        gens.append(row[:k])
    forward = nnx.jit(lambda m, *args: m(*args))
    if family == "llama":
        seq_ids, seq_mask = right_pad([x + g for x, g in zip(ids, gens)])
        logits = np.asarray(forward(model, seq_ids, seq_mask))
        for r, (x, g) in enumerate(zip(ids, gens)):
            want = logits[r, len(x) - 1:len(x) - 1 + len(g)].argmax(-1)
            np.testing.assert_array_equal(g, want, err_msg=f"row {r} ({prompts[r]!r})")
    else:
        dec_ids, dec_mask = right_pad([[0] + g[:-1] for g in gens])
        logits = np.asarray(forward(model, input_ids, mask, dec_ids, dec_mask))
        for r, g in enumerate(gens):
            np.testing.assert_array_equal(g, logits[r, :len(g)].argmax(-1),
                                          err_msg=f"row {r} ({prompts[r]!r})")


def right_pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids = np.array([x + [0] * (width - len(x)) for x in rows], np.int32)
    mask = np.array([[1] * len(x) + [0] * (width - len(x)) for x in rows], np.int32)
    return ids, mask


def test_default_extract_answer():
    assert default_extract_answer("2+9=11,1+0+1=2 = 21 ") == "21"
    assert default_extract_answer("so the answer is 42.") == "42"
    assert default_extract_answer("a=1, thus the answer is b") == "b"
    assert default_extract_answer(" plain ") == "plain"
