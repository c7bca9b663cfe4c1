"""jaxgrad.train.evaluate against torch transformers and numpy: answer-choice log-likelihoods
and accuracy (also with a T5 whose decoder start token is not its pad id, issue 12 kind 6), the
evaluator's per-source losses in metrics.jsonl and its exact-match accuracy (filler rows of the
last batch not counted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch  # the test extra installs torch (CPU) and transformers: references, never skipped
from flax import nnx

from helpers.models import QA_EXAMPLES, llama_and_torch_reference, token_ids
from helpers.models import START_EXAMPLES
from helpers.training import quick_cfg, tiny_data, tiny_model
from jaxgrad.common import sharding as sharding_lib
from jaxgrad.models import load_pretrained
from jaxgrad.models.forward import model_logits
from jaxgrad.train import fit, make_evaluator
from jaxgrad.train.evaluate import answer_choices, choice_accuracy, choice_log_likelihoods


@pytest.fixture(scope="module")
def llama():
    return llama_and_torch_reference()


def test_choice_log_likelihoods_match_torch(llama):
    """log p(choice | prompt) summed over the choice's own tokens (no EOS), as torch computes it
    on BOS + prompt + choice."""
    model, tok, ref = llama
    choices = ["Yes", "No", "Maybe not"]
    ll = choice_log_likelihoods(model, tok, QA_EXAMPLES, choices, sources=["qa"], max_length=64,
                                batch_size=4)
    assert ll.shape == (3, 3) and ll.dtype == np.float64
    for i, e in enumerate(QA_EXAMPLES):
        for j, c in enumerate(choices):
            p, a = token_ids(tok, e["prompt"]), token_ids(tok, c)
            seq = torch.tensor([[tok.bos_token_id] + p + a])
            with torch.no_grad():
                logp = torch.log_softmax(ref(seq).logits[0].double(), -1)
            want = sum(float(logp[len(p) + t, a[t]]) for t in range(len(a)))
            assert ll[i, j] == pytest.approx(want, abs=2e-4), (e["prompt"], c)


def test_choice_accuracy_and_answer_sets(llama):
    model, tok, _ = llama
    choices = answer_choices(QA_EXAMPLES)
    assert choices == ("No", "Yes")
    acc, correct = choice_accuracy(model, tok, QA_EXAMPLES, choices, sources=["qa"], max_length=64)
    ll = choice_log_likelihoods(model, tok, QA_EXAMPLES, choices, sources=["qa"], max_length=64)
    gold = np.array([choices.index(e["answer"]) for e in QA_EXAMPLES])
    np.testing.assert_array_equal(correct, ll.argmax(1) == gold)
    assert acc == pytest.approx(correct.mean())
    with pytest.raises(ValueError, match="not among the choices"):
        choice_accuracy(model, tok, QA_EXAMPLES, ["Yes", "Maybe"], sources=["qa"], max_length=64)
    # open-ended answers, missing answers and single answers have no closed choice set
    assert answer_choices([{**QA_EXAMPLES[0], "answer": str(i)} for i in range(11)]) is None
    assert answer_choices([{**QA_EXAMPLES[0], "answer": None}, QA_EXAMPLES[1]]) is None
    assert answer_choices([QA_EXAMPLES[0], QA_EXAMPLES[2]]) is None


def test_choice_log_likelihoods_use_the_decoder_start(t5_start7):
    from jaxgrad.train.evaluate import choice_log_likelihoods

    d, m = t5_start7
    model, tokenizer = load_pretrained(d)
    choices = ["chat", "chien"]
    got = choice_log_likelihoods(model, tokenizer, START_EXAMPLES[:2], choices, sources=["s"],
                                 max_length=32)
    for i, e in enumerate(START_EXAMPLES[:2]):
        for j, c in enumerate(choices):
            enc = torch.tensor([tokenizer(e["prompt"], add_special_tokens=False)["input_ids"] + [2]])
            lab = torch.tensor([tokenizer(c, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(m(input_ids=enc, labels=lab).logits, -1)
            want = float(logp[0, torch.arange(lab.shape[1]), lab[0]].sum())
            assert got[i, j] == pytest.approx(want, abs=2e-4), (i, c)


def test_per_source_metrics_in_jsonl_match_reference(tmp_path):
    """metrics.jsonl's per-source validation losses equal a numpy token-weighted cross-entropy."""
    from jaxgrad.data import batching

    d = tiny_data()
    model, tok = tiny_model()
    result = fit(model, tok, d.examples("train"), quick_cfg(num_steps=4, eval_every=2),
                 str(tmp_path), val_examples=d.examples("validation"), sources=d.sources)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4], f"eval rows at steps {[r['step'] for r in evals]}"
    last = evals[-1]
    for source in d.sources:
        exs = d.examples("validation", [source])
        enc = batching.encode_examples(exs, tok, sources=d.sources)
        batch = batching.collate(enc, range(len(exs)), max_length=32)
        logits = np.asarray(nnx.jit(model_logits)(result.model, batch), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                  keepdims=True)) \
            - logits.max(-1, keepdims=True)
        gold = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        ref = float(-(gold * batch["target_mask"]).sum() / batch["target_mask"].sum())
        key = f"val_loss/{source}"
        assert key in last, f"{key} missing from the eval row {sorted(last)}"
        assert last[key] == pytest.approx(ref, rel=1e-5), f"{key}: {last[key]} vs reference {ref}"


def test_accuracy_counts_exact_matches_per_source(tmp_path):
    """With an extractor that always answers "yes", accuracy is the share of answers "yes"."""
    d = tiny_data()
    model, tok = tiny_model()
    exs = d.examples("validation")
    for i, e in enumerate(exs):
        e["answer"] = "yes" if i % 4 == 0 else ("no" if i % 4 == 1 else None)
    cfg = quick_cfg(num_steps=1, max_new_tokens=3)
    ev = make_evaluator(model, tok, exs, cfg, sources=d.sources, extract_answer=lambda t: "yes")
    metrics = ev(model, sharding_lib.make_mesh(1, 1))
    for source in d.sources:
        scored = [e for e in exs if e["source"] == source and e["answer"] is not None]
        want = np.mean([e["answer"] == "yes" for e in scored])
        assert metrics[f"val_acc/{source}"] == pytest.approx(want), (source, metrics)
    assert metrics["val_acc"] == pytest.approx(0.5)


def test_accuracy_with_filler_rows_in_the_last_batch():
    """The last evaluation batch is filled up with all-zero rows; generation must accept them
    (they are not a padding layout error) and they must not count."""
    d = tiny_data()
    model, tok = tiny_model()
    cfg = quick_cfg(num_steps=1, max_new_tokens=2)
    exs = d.examples("validation")
    exs = exs[:cfg.batch_size + 1]  # one full batch and a batch with one real row
    for e in exs:
        e["answer"] = "yes"
    ev = make_evaluator(model, tok, exs, cfg, sources=d.sources, extract_answer=lambda t: "yes")
    metrics = ev(model, sharding_lib.make_mesh(1, 1))
    assert metrics["val_acc"] == pytest.approx(1.0)
