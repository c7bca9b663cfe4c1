"""Small shared helpers for tests: the repository's paths and hand-built batches from the fixture
reference inputs.

Test files live one folder below tests/ (tests/<package>/test_<module>.py), so a path computed
from a test's own ``__file__`` depends on its depth: use :data:`REPO`, :data:`TESTS` and
:func:`fixture` instead. The submodules hold helpers shared by test files of one package:
:mod:`helpers.data`, :mod:`helpers.models`, :mod:`helpers.gradients`, :mod:`helpers.stores`,
:mod:`helpers.training` and :mod:`helpers.runs` (tiny pipeline runs). pyproject.toml puts tests/
on ``sys.path`` (``pythonpath``), so ``import helpers`` works from every folder; a subprocess a
test starts needs :data:`TESTS` on its own path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)
FIXTURES = os.path.join(TESTS, "fixtures")

# A report excerpt with two markdown tables, for the table parsing and comparison of the README's
# demo figures (jaxgrad.pipeline.report.compare_tables, scripts/check_readme.py).
SMALL_REPORT = """# report

| rank | source | score |
|---|---|---|
| 1 | add | -0.2925 |
| 2 | sub | -0.3214 |

text

| run | test token cross-entropy |
|---|---|
| selection | 0.3216 |
"""


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def fixture_batch(name: str, prompt_len: int = 2) -> dict:
    """A right-padded batch in jaxgrad.data.batching's layout built from reference.npz.

    Decoder: targets are the next tokens, the mask covers real next tokens after the first
    ``prompt_len`` positions. Encoder-decoder: targets are the labels, masked by the decoder mask.
    """
    ref = dict(np.load(os.path.join(fixture(name), "reference.npz")))
    ids, mask = ref["input_ids"].astype(np.int32), ref["attention_mask"].astype(np.int32)
    b = ids.shape[0]
    batch = {"input_ids": ids, "attention_mask": mask, "valid": np.ones((b,), np.float32),
             "example_index": np.arange(b, dtype=np.int32), "source_index": np.zeros((b,), np.int32)}
    if "decoder_input_ids" in ref:
        dmask = ref["decoder_attention_mask"].astype(np.int32)
        batch.update(decoder_input_ids=ref["decoder_input_ids"].astype(np.int32),
                     decoder_attention_mask=dmask,
                     targets=np.where(dmask > 0, ref["labels"], 0).astype(np.int32),
                     target_mask=dmask.astype(np.float32))
    else:
        targets = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
        tmask = np.concatenate([mask[:, 1:], np.zeros((b, 1), np.int32)], axis=1).astype(np.float32)
        tmask[:, :prompt_len] = 0
        batch.update(targets=targets, target_mask=tmask)
    return batch


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """``scripts/<name> args`` in a subprocess from the repository root, on the CPU."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def assert_one_line_refusal(out: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit status 2 and one line on stderr holding every ``expected`` text."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert len(lines) == 1 and all(e in lines[0] for e in expected), out.stderr[-3000:]
