"""The gradient stage: store contents, resume after a crash, and 2 processes under jax.distributed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxgrad.data.batching import collate, encode_examples
from jaxgrad.data.synthetic import SyntheticSpec, synthetic_sources
from jaxgrad.gradients.compute import compute_gradient_store
from jaxgrad.models import LoraConfig, load_pretrained
from jaxgrad.models.layers import named_variables
from jaxgrad.gradients.per_sample import num_trainable, per_sample_projected_grads
from jaxgrad.gradients.projection import Projector
from jaxgrad.gradients.manifest import StoreMismatchError
from jaxgrad.gradients.store import GradientStore

from helpers import fixture

SPEC = SyntheticSpec(tasks=("add", "copy"), noisy=("add",), unrelated=1, n_train=6, n_validation=2,
                     n_test=2, seed=0)


def setup():
    model, tok = load_pretrained(fixture("tiny-llama"), lora=LoraConfig(rank=2, seed=1))
    for name, var in named_variables(model).items():
        if name.endswith("lora_B"):
            var[...] = var[...] + 0.05  # a nonzero adapter: every LoRA gradient informative
    data = synthetic_sources(SPEC)
    examples = data.examples("train")
    proj = Projector(seed=5, dim=num_trainable(model), k=8)
    return model, tok, data, examples, proj


KW = dict(split="train", batch_size=4, chunk_size=2, max_length=48, shard_size=5)


def test_store_rows_equal_direct_computation(tmp_path):
    model, tok, data, examples, proj = setup()
    store = compute_gradient_store(model, examples, tok, proj, str(tmp_path / "g"), sources=data.sources, **KW)
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
    model, tok, data, examples, proj = setup()
    full = compute_gradient_store(model, examples, tok, proj, str(tmp_path / "full"), sources=data.sources, **KW)

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
            compute_gradient_store(model, examples, tok, proj, str(tmp_path / "resumed"), sources=data.sources, **KW)
    finally:
        GradientStore.write_shard = orig_write
    resumed = compute_gradient_store(model, examples, tok, proj, str(tmp_path / "resumed"), sources=data.sources, **KW)
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
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import jax
        pid, n, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        if n > 1:
            jax.distributed.initialize(coordinator_address=f"127.0.0.1:{{port}}",
                                       num_processes=n, process_id=pid)
        assert jax.process_count() == n and jax.process_index() == pid
        from test_gradients import setup, KW
        from jaxgrad.gradients.compute import compute_gradient_store
        model, tok, data, examples, proj = setup()
        compute_gradient_store(model, examples, tok, proj, out, sources=data.sources,
                               process_index=jax.process_index(), process_count=jax.process_count(), **KW)
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
