"""Answer-choice likelihoods and last-layer representations against torch transformers."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import fixture
from jaxgrad.train.evaluate import answer_choices, choice_accuracy, choice_log_likelihoods
from jaxgrad.models import load_pretrained
from jaxgrad.select.representations import mean_representations

import torch  # noqa: E402  (the test extra installs it)
import transformers  # noqa: E402

EXAMPLES = [
    {"source": "qa", "prompt": "Q: Is ice cold?\nA: ", "completion": "Yes. It is frozen.",
     "answer": "Yes"},
    {"source": "qa", "prompt": "Q: Do fish fly?\nA: ", "completion": "No. They swim.",
     "answer": "No"},
    {"source": "qa", "prompt": "Q: Is the sun hot and bright in summer?\nA: ",
     "completion": "Yes. Very.", "answer": "Yes"},
]


@pytest.fixture(scope="module")
def llama():
    model, tok = load_pretrained(fixture("tiny-llama"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(fixture("tiny-llama"),
                                                            torch_dtype=torch.float32).eval()
    return model, tok, ref


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_choice_log_likelihoods_match_torch(llama):
    """log p(choice | prompt) summed over the choice's own tokens (no EOS), as torch computes it
    on BOS + prompt + choice."""
    model, tok, ref = llama
    choices = ["Yes", "No", "Maybe not"]
    ll = choice_log_likelihoods(model, tok, EXAMPLES, choices, sources=["qa"], max_length=64,
                                batch_size=4)
    assert ll.shape == (3, 3) and ll.dtype == np.float64
    for i, e in enumerate(EXAMPLES):
        for j, c in enumerate(choices):
            p, a = _ids(tok, e["prompt"]), _ids(tok, c)
            seq = torch.tensor([[tok.bos_token_id] + p + a])
            with torch.no_grad():
                logp = torch.log_softmax(ref(seq).logits[0].double(), -1)
            want = sum(float(logp[len(p) + t, a[t]]) for t in range(len(a)))
            assert ll[i, j] == pytest.approx(want, abs=2e-4), (e["prompt"], c)


def test_choice_accuracy_and_answer_sets(llama):
    model, tok, _ = llama
    choices = answer_choices(EXAMPLES)
    assert choices == ("No", "Yes")
    acc, correct = choice_accuracy(model, tok, EXAMPLES, choices, sources=["qa"], max_length=64)
    ll = choice_log_likelihoods(model, tok, EXAMPLES, choices, sources=["qa"], max_length=64)
    gold = np.array([choices.index(e["answer"]) for e in EXAMPLES])
    np.testing.assert_array_equal(correct, ll.argmax(1) == gold)
    assert acc == pytest.approx(correct.mean())
    with pytest.raises(ValueError, match="not among the choices"):
        choice_accuracy(model, tok, EXAMPLES, ["Yes", "Maybe"], sources=["qa"], max_length=64)
    # open-ended answers, missing answers and single answers have no closed choice set
    assert answer_choices([{**EXAMPLES[0], "answer": str(i)} for i in range(11)]) is None
    assert answer_choices([{**EXAMPLES[0], "answer": None}, EXAMPLES[1]]) is None
    assert answer_choices([EXAMPLES[0], EXAMPLES[2]]) is None


def test_mean_representations_match_torch_last_hidden_state(llama):
    """Mean over the real tokens (BOS + prompt + completion + EOS) of the last hidden state after
    the final norm: transformers' hidden_states[-1]; independent of the batch size."""
    model, tok, ref = llama
    reps = mean_representations(model, tok, EXAMPLES, sources=["qa"], max_length=64, batch_size=2)
    assert reps.shape == (3, ref.config.hidden_size) and reps.dtype == np.float32
    for i, e in enumerate(EXAMPLES):
        seq = [tok.bos_token_id] + _ids(tok, e["prompt"]) + _ids(tok, e["completion"]) + \
            [tok.eos_token_id]
        with torch.no_grad():
            h = ref(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]
        np.testing.assert_allclose(reps[i], h.mean(0).numpy(), atol=1e-4, rtol=1e-4)
    again = mean_representations(model, tok, EXAMPLES, sources=["qa"], max_length=64, batch_size=3)
    np.testing.assert_allclose(again, reps, atol=1e-5)
