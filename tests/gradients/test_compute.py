"""The gradient stage: store contents, resume after a crash, and 2 processes under jax.distributed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch  # the test extra installs torch (CPU) and transformers: references, never skipped

from helpers import TESTS
from helpers.gradients import STORE_KW, store_inputs
from helpers.models import START, START_EXAMPLES
from jaxgrad.data.batching import collate, encode_examples
from jaxgrad.gradients.compute import compute_gradient_store
from jaxgrad.gradients.manifest import StoreMismatchError
from jaxgrad.gradients.per_sample import per_sample_projected_grads
from jaxgrad.gradients.store import GradientStore


def test_store_rows_equal_direct_computation(tmp_path):
    model, tok, data, examples, proj = store_inputs()
    store = compute_gradient_store(model, examples, tok, proj, str(tmp_path / "g"), sources=data.sources, **STORE_KW)
    assert store.complete and store.num_examples == len(examples) == 24
    enc = encode_examples(examples, tok, sources=data.sources)
    batch = collate(enc, [3, 11, 17], max_length=48)
    direct = per_sample_projected_grads(model, batch, proj, chunk_size=3)
    feats, f, ids = store.feats_for(example_ids=[examples[i]["example_id"] for i in (3, 11, 17)])
    np.testing.assert_allclose(feats, np.asarray(direct.feats), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f, np.asarray(direct.f), rtol=1e-5, atol=1e-6)
    # reopening with a different projector is refused, naming the field
    with pytest.raises(StoreMismatchError, match="projector"):
        GradientStore.open(str(tmp_path / "g"), projector={"seed": 6, "kind": "rademacher",
                                                           "dim": proj.dim, "k": 8})


def test_resume_after_crash_gives_same_store(tmp_path):
    model, tok, data, examples, proj = store_inputs()
    full = compute_gradient_store(model, examples, tok, proj, str(tmp_path / "full"), sources=data.sources, **STORE_KW)

    class Crash(Exception):
        pass

    calls = {"n": 0}
    orig_write = GradientStore.write_shard

    def crashing_write(self, i, feats, f, **kw):  # the third shard write dies
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash()
        return orig_write(self, i, feats, f, **kw)

    GradientStore.write_shard = crashing_write
    try:
        with pytest.raises(Crash):
            compute_gradient_store(model, examples, tok, proj, str(tmp_path / "resumed"), sources=data.sources, **STORE_KW)
    finally:
        GradientStore.write_shard = orig_write
    resumed = compute_gradient_store(model, examples, tok, proj, str(tmp_path / "resumed"), sources=data.sources, **STORE_KW)
    assert resumed.complete
    np.testing.assert_array_equal(resumed.feats(), full.feats())
    np.testing.assert_array_equal(resumed.f(), full.f())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_jax_distributed_write_the_same_store(tmp_path):
    # Both stores are written by CPU subprocesses, so the comparison is bit for bit on one
    # platform even where the test session itself runs on a GPU (TF32 matmuls there).
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        import jax
        pid, n, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        if n > 1:
            jax.distributed.initialize(coordinator_address=f"127.0.0.1:{{port}}",
                                       num_processes=n, process_id=pid)
        assert jax.process_count() == n and jax.process_index() == pid
        from helpers.gradients import STORE_KW, store_inputs
        from jaxgrad.gradients.compute import compute_gradient_store
        model, tok, data, examples, proj = store_inputs()
        compute_gradient_store(model, examples, tok, proj, out, sources=data.sources,
                               process_index=jax.process_index(), process_count=jax.process_count(), **STORE_KW)
        if n > 1:
            jax.distributed.shutdown()
    """)
    path = tmp_path / "worker.py"
    path.write_text(script)
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def run(n: int, out: str) -> None:
        port = str(_free_port())
        procs = [subprocess.Popen([sys.executable, str(path), str(p), str(n), port, out], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for p in range(n)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]

    run(1, str(tmp_path / "one"))
    single = GradientStore.merge(str(tmp_path / "one"))
    run(2, str(tmp_path / "two"))
    merged = GradientStore.merge(str(tmp_path / "two"))
    assert merged.complete
    np.testing.assert_array_equal(merged.feats(), single.feats())
    np.testing.assert_array_equal(merged.f(), single.f())
    assert merged.example_ids == single.example_ids


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
    store = compute_gradient_store(model, START_EXAMPLES, tokenizer,
                                   Projector(seed=0, dim=num_trainable(model), k=16),
                                   str(tmp_path / "store"), split="train", sources=["s"],
                                   output_fn="token_ce", batch_size=2, chunk_size=2, max_length=32)
    want = [_torch_loss(m, tokenizer, e["prompt"], e["completion"])
            for e in START_EXAMPLES]
    np.testing.assert_allclose(store.f(), want, rtol=1e-4, atol=1e-4,
                               err_msg="f_i (token CE) of the store vs torch with labels= "
                                       "(decoder starts with decoder_start_token_id)")
