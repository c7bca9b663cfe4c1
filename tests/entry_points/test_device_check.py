"""benchmarks/device_check.py --smoke: every part runs on CPU at toy sizes, the Pallas
projection (interpret mode) agrees with the XLA path, the throughputs are positive, and neither
``datasets`` nor ``ml_collections`` is imported (the GPU machine lacks them).

The script runs once, in a subprocess whose ``sys.meta_path`` refuses those two packages and logs
every attempt to import them, so even an import guarded by ``try/except ImportError`` is caught.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "device_check.py")
PARTS = ("projection", "per_sample", "batched", "surrogate")

# Run the script as __main__ with the two packages made unimportable; argv: log path, JSON path.
_WRAPPER = """
import runpy, sys
log_path, out_path, script = sys.argv[1:4]
BLOCKED = ("datasets", "ml_collections")

class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            with open(log_path, "a") as f:
                f.write(name + "\\n")
            raise ImportError(f"{name} is refused by tests/entry_points/test_device_check.py")
        return None

for name in BLOCKED:
    sys.modules.pop(name, None)
sys.meta_path.insert(0, _Refuse())
sys.argv = [script, "--smoke", "--out", out_path]
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device_check")
    log_path, out_path = tmp / "blocked_imports.log", tmp / "x.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(log_path), str(out_path), SCRIPT],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    with open(out_path) as f:
        data = json.load(f)
    blocked = log_path.read_text().split() if log_path.exists() else []
    return data, blocked, proc.stdout


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_part_ran_without_error(smoke):
    data, _, stdout = smoke
    assert data["smoke"] is True and data["failed"] == []
    for part in PARTS:
        assert part in data, part
        assert "error" not in data[part], f"{part}: {data[part].get('error')}"
        assert data[part].get("status") != "pending", part
    assert "done in" in stdout


def test_no_datasets_or_ml_collections(smoke):
    data, blocked, _ = smoke
    assert blocked == [], f"the script tried to import {blocked}"
    assert not {"datasets", "ml_collections"} & set(data["imported_optional"])


def test_pallas_agrees_with_xla(smoke):
    p = smoke[0]["projection"]
    assert p["agree"] is True
    assert set(p["cases"]) == {"float32", "bfloat16"}
    for dtype, case in p["cases"].items():
        diff, tol = case["max_abs_diff"], case["tolerance"]
        assert math.isfinite(diff) and diff <= tol, (dtype, diff, tol)
        assert tol == pytest.approx(p["rtol"] * case["max_abs_ref"]) and case["max_abs_ref"] > 0
        assert case["int_bit_equal"] is True and case["int_max_abs_diff"] == 0.0, dtype
        for backend in ("xla", "pallas"):
            assert _positive(case[backend]["median_s"]) and _positive(case[backend]["first_call_s"])


def test_throughputs_positive_and_finite(smoke):
    data = smoke[0]
    ps, b, s = data["per_sample"], data["batched"], data["surrogate"]
    for r in (ps, b):
        assert _positive(r["samples_per_s"]) and _positive(r["median_s"])
        assert r["compile_s"] >= 0 and r["first_call_s"] >= r["compile_s"]
        assert r["mfu"] is None  # no peak for a CPU
    assert ps["feats_finite"] and b["grads_finite"]
    assert "warning" not in ps  # the counted D equals the model's LoRA size
    assert ps["lora_dim"] == ps["flops_per_sample"]["lora_dim"]
    assert _positive(s["subsets_per_s"]) and s["subsets"] == 1000
    assert s["converged_fraction"] == 1.0


def _load_script():
    spec = importlib.util.spec_from_file_location("device_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flop_count_of_tinyllama_shape():
    dc = _load_script()
    fl = dc.flops_per_sample(dc.TINYLLAMA, seq_len=256, rank=16, k=8192)
    assert fl["n_params"] == 1_100_048_384  # TinyLlama-1.1B's parameter count
    # 22 layers × r 16 × (q: 2048+2048, k: 2048+256, v: 2048+256)
    assert fl["lora_dim"] == 22 * 16 * (4096 + 2304 + 2304) == 3_063_808
    assert fl["forward_base_matmuls"] == 2 * 256 * fl["n_matmul_params"]
    assert fl["forward_attention"] == 4 * 22 * 256**2 * 2048
    assert fl["projection"] == 2 * 3_063_808 * 8192
    assert fl["per_sample_step"] == fl["batched_step"] + fl["projection"]
    assert dc.peak_flops("NVIDIA H200", None) == 989e12
    assert dc.peak_flops("cpu", None) is None and dc.peak_flops("cpu", 2.0) == 2e12


def test_results_md_block_renders(smoke):
    """The RESULTS.md section (written only by GPU runs) renders from a smoke JSON."""
    dc = _load_script()
    block = dc.markdown(smoke[0])
    for text in ("**Projection**", "| per-sample", "| batched", "**Surrogate fits**",
                 "FLOPs per sample"):
        assert text in block, text
