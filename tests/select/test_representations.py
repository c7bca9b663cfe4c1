"""jaxgrad.select.representations: mean last-layer representations against torch transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch  # the test extra installs torch (CPU) and transformers: references, never skipped
import transformers

from helpers import fixture
from jaxgrad.models import load_pretrained
from jaxgrad.select.representations import mean_representations


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
