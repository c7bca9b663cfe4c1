"""jaxgrad.select.representations: mean last-layer representations against torch transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch  # the test extra installs torch (CPU) and transformers: references, never skipped

from helpers.models import QA_EXAMPLES, llama_and_torch_reference, token_ids
from jaxgrad.select.representations import mean_representations


@pytest.fixture(scope="module")
def llama():
    return llama_and_torch_reference()


def test_mean_representations_match_torch_last_hidden_state(llama):
    """Mean over the real tokens (BOS + prompt + completion + EOS) of the last hidden state after
    the final norm: transformers' hidden_states[-1]; independent of the batch size."""
    model, tok, ref = llama
    reps = mean_representations(model, tok, QA_EXAMPLES, sources=["qa"], max_length=64, batch_size=2)
    assert reps.shape == (3, ref.config.hidden_size) and reps.dtype == np.float32
    for i, e in enumerate(QA_EXAMPLES):
        seq = [tok.bos_token_id] + token_ids(tok, e["prompt"]) + token_ids(tok, e["completion"]) + \
            [tok.eos_token_id]
        with torch.no_grad():
            h = ref(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]
        np.testing.assert_allclose(reps[i], h.mean(0).numpy(), atol=1e-4, rtol=1e-4)
    again = mean_representations(model, tok, QA_EXAMPLES, sources=["qa"], max_length=64, batch_size=3)
    np.testing.assert_allclose(again, reps, atol=1e-5)
