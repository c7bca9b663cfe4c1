"""Issue 12, kinds 6 and 7: the encoder-decoder start token and the padding side, vs torch.

Kind 6: a T5 whose ``decoder_start_token_id`` is not its pad id (MADLAD-400's is not). Every
place that builds encoder-decoder batches reads the start from the model
(``jaxgrad.models.forward.model_layout``): the gradient store's outputs f_i, the answer-choice
log-likelihoods and greedy generation must equal torch's, whose ``_shift_right`` and ``generate``
use the config's start token.

Kind 7: ``jaxgrad.train.generate`` on left-padded prompts (transformers' generation layout) gives
each row what the prompt gives alone, and what transformers' ``generate`` gives; masks that are
not a padding layout are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch  # the test extra installs torch (CPU) and transformers: references, never skipped
import transformers

from helpers import fixture

START = 7  # decoder start token, distinct from pad (0) and eos (2)


@pytest.fixture(scope="module")
def t5_start7(tmp_path_factory):
    """(directory, torch model): a tiny random T5 with decoder_start_token_id=7."""
    from jaxgrad.data import build_char_tokenizer

    d = tmp_path_factory.mktemp("t5_start7")
    tok = build_char_tokenizer()  # pad 0, bos 1, eos 2
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                relative_attention_max_distance=12, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False, dropout_rate=0.0, pad_token_id=0,
                                eos_token_id=2, decoder_start_token_id=START)
    m = transformers.T5ForConditionalGeneration(cfg).eval()
    m.save_pretrained(d)
    return str(d), m


EXAMPLES = [{"example_id": f"s/{i}", "source": "s", "prompt": p, "completion": c, "answer": None}
            for i, (p, c) in enumerate([("translate: cat", "chat"), ("translate: dog", "chien"),
                                        ("say: a b", "ab")])]


def _torch_loss(m, tokenizer, prompt, completion):
    enc = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"] + [2]])
    lab = torch.tensor([tokenizer(completion, add_special_tokens=False)["input_ids"] + [2]])
    with torch.no_grad():
        return float(m(input_ids=enc, labels=lab).loss)


def test_gradient_store_outputs_use_the_decoder_start(t5_start7, tmp_path):
    from jaxgrad.gradients.compute import compute_gradient_store
    from jaxgrad.models import LoraConfig, load_pretrained
    from jaxgrad.gradients.per_sample import num_trainable
    from jaxgrad.gradients.projection import Projector

    d, m = t5_start7
    model, tokenizer = load_pretrained(d, lora=LoraConfig(rank=2, alpha=4))
    assert model.config.decoder_start_token_id == START
    store = compute_gradient_store(model, EXAMPLES, tokenizer,
                                   Projector(seed=0, dim=num_trainable(model), k=16),
                                   str(tmp_path / "store"), split="train", sources=["s"],
                                   output_fn="token_ce", batch_size=2, chunk_size=2, max_length=32)
    want = [_torch_loss(m, tokenizer, e["prompt"], e["completion"]) for e in EXAMPLES]
    np.testing.assert_allclose(store.f(), want, rtol=1e-4, atol=1e-4,
                               err_msg="f_i (token CE) of the store vs torch with labels= "
                                       "(decoder starts with decoder_start_token_id)")


def test_choice_log_likelihoods_use_the_decoder_start(t5_start7):
    from jaxgrad.train.evaluate import choice_log_likelihoods
    from jaxgrad.models import load_pretrained

    d, m = t5_start7
    model, tokenizer = load_pretrained(d)
    choices = ["chat", "chien"]
    got = choice_log_likelihoods(model, tokenizer, EXAMPLES[:2], choices, sources=["s"],
                                 max_length=32)
    for i, e in enumerate(EXAMPLES[:2]):
        for j, c in enumerate(choices):
            enc = torch.tensor([tokenizer(e["prompt"], add_special_tokens=False)["input_ids"] + [2]])
            lab = torch.tensor([tokenizer(c, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(m(input_ids=enc, labels=lab).logits, -1)
            want = float(logp[0, torch.arange(lab.shape[1]), lab[0]].sum())
            assert got[i, j] == pytest.approx(want, abs=2e-4), (i, c)


def test_t5_generation_starts_like_transformers(t5_start7):
    from jaxgrad.models import load_pretrained
    from jaxgrad.train import generate

    d, m = t5_start7
    model, tokenizer = load_pretrained(d)
    ids = [tokenizer(e["prompt"], add_special_tokens=False)["input_ids"] + [2] for e in EXAMPLES]
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
