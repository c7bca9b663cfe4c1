"""Test-session set-up: JAX's persistent compilation cache (jaxgrad.pipeline.runtime), shared by the tests
and the subprocesses they start (through the environment), so the tiny pipeline's programs are
compiled once per session rather than once per fixture, test and process. Results do not depend
on it; a fresh checkout starts with an empty cache under the system's temporary directory.

Float32 matrix products run at full float32 precision (``jax_default_matmul_precision``
"highest", also in the subprocesses): JAX's default lets a GPU use TF32 (10-bit mantissa), which
moves logits by ~1e-3 relative, ten times the references' bounds here. On a CPU it changes
nothing; users choose the precision with the same flag (README, "GPU and TPU").

It also holds the fixtures that are expensive to build and used by test files of several
packages, built once per session (tests/README.md): ``run_dir``, the tiny pipeline run, and
``t5_start7``, a T5 whose decoder start token is not its pad id. Tests must not change what they
return: a test that writes into a run directory copies it first (``shutil.copytree``)."""

import os
import tempfile

import pytest

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"jaxgrad-tests-xla-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """The tiny pipeline (configs/demo.py:tiny) run to the end in two goes: the first three
    stages, "interrupted", then everything; the second run reuses the earlier stages.

    Read-only for the tests: copy it (``shutil.copytree``) before running anything in it."""
    from configs import demo
    from jaxgrad.pipeline import run_pipeline

    workdir = str(tmp_path_factory.mktemp("pipeline"))
    config = demo.get_config("tiny")
    first = run_pipeline(config, workdir, stages=["base", "meta_train", "gradients"])
    assert first["gradients"] == {"train": 3 * 32, "target": 8}
    stamp = os.path.getmtime(os.path.join(workdir, "meta_train", "done.json"))
    shards = sorted(os.listdir(os.path.join(workdir, "gradients", "train")))
    out = run_pipeline(config, workdir)
    assert os.path.getmtime(os.path.join(workdir, "meta_train", "done.json")) == stamp, \
        "meta_train ran again although its artefact existed"
    assert sorted(os.listdir(os.path.join(workdir, "gradients", "train"))) == shards
    assert out["timings"]["base"] < 5 and out["timings"]["meta_train"] < 5  # skipped, not rerun
    return workdir


@pytest.fixture(scope="session")
def t5_start7(tmp_path_factory):
    """(directory, torch model): a tiny random T5 with decoder_start_token_id=7 (issue 12,
    kind 6), for the gradient store, the answer-choice likelihoods and generation."""
    from helpers.models import save_t5_start7

    return save_t5_start7(tmp_path_factory.mktemp("t5_start7"))
