"""GGUF checkpoints (llama.cpp's format), converted once into a cached Hugging Face directory.

``load_pretrained("model.gguf")`` comes here first: :func:`gguf_to_hf` returns a float32 Hugging
Face directory (config.json, model.safetensors, tokenizer files) made from the GGUF, which
``load_pretrained`` then reads like any other. The dequantisation is transformers' own
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)``, which uses the ``gguf`` package's
dequantisers); we write no dequantiser. Needs the optional extra: ``pip install -e ".[gguf]"``
(the packages ``gguf``, ``accelerate``, ``torch``).

The converted directory (the *cache*) is ``<stem>.hf/`` next to the GGUF, or ``<cache_dir>/<stem>.hf/``
with ``cache_dir=`` or the environment variable ``JAXGRAD_GGUF_CACHE``. It is written to a temporary
directory beside it and renamed into place, so an interrupted conversion never leaves a directory
that is later trusted. Its ``gguf_source.json`` records what it was made from (GGUF path, size,
modification time, sha256; transformers and gguf versions; the quantisation type) and it is rebuilt
when the GGUF changes: same size and modification time are taken as unchanged, otherwise the sha256
decides. The same record (less the file times) sits in ``config.json`` under ``"gguf_source"``, so
anything that reads the checkpoint can tell that its weights are a dequantised GGUF
(:func:`gguf_source`, :func:`describe_gguf_source`).

Fixes applied to the converted checkpoint, so that transformers 4.57 reads it like 5.x does:
``rope_theta`` also at the top level of config.json (4.x ignores ``rope_parameters`` and would fall
back to 10000), and ``tokenizer_class: PreTrainedTokenizerFast`` in tokenizer_config.json (5.x
writes ``TokenizersBackend``, unknown to 4.x).

Supported GGUF architectures (``general.architecture``): ``llama`` (Llama 2/3, TinyLlama, SmolLM,
and Mistral files, which llama.cpp writes as ``llama``), ``qwen2`` and ``gemma3`` (Gemma 3 text
models; transformers reads them as ``gemma3_text``, subtracts the 1 llama.cpp adds to every Gemma
norm weight, and takes what the file does not hold from ``Gemma3TextConfig``'s defaults:
``query_pre_attn_scalar`` 256, ``sliding_window_pattern`` 6, the sliding layers' rope base 10000,
no rope scaling; right for Gemma 3 270M and 1B, see docs/models/gemma3.md). For Gemma 3 the
converted config.json also gets ``rope_theta`` and ``rope_local_base_freq`` at the top level, the
names transformers 4 reads.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from typing import Any

from jaxgrad._compat import moved_names
from jaxgrad.common.digest import file_sha256

GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma3")
CACHE_ENV = "JAXGRAD_GGUF_CACHE"
RECORD_FILE = "gguf_source.json"
CACHE_FORMAT = 1  # bump when the conversion changes: every cache is rebuilt
REQUIRED_PACKAGES = ("gguf", "accelerate", "torch")
INSTALL_HINT = 'pip install -e ".[gguf]"  (or: pip install gguf accelerate torch)'


def find_gguf(path: str) -> str | None:
    """The GGUF file ``path`` names, or None when it is not a GGUF checkpoint.

    ``path`` is a ``.gguf`` file, or a directory with no config.json holding exactly one ``.gguf``
    file. A directory with config.json is a Hugging Face directory (None).

    Raises:
      FileNotFoundError: a directory with neither config.json nor a ``.gguf`` file.
      ValueError: a directory without config.json holding several ``.gguf`` files.
    """
    if os.path.isfile(path):
        return path if path.lower().endswith(".gguf") else None
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf")
                   and os.path.isfile(os.path.join(path, f)))
    if not found:
        raise FileNotFoundError(f"{path}: no config.json and no .gguf file; expected a Hugging Face "
                                "model directory or a GGUF checkpoint")
    if len(found) > 1:
        raise ValueError(f"{path}: {len(found)} .gguf files ({', '.join(found)}) and no config.json; "
                         "pass the path of the one to load")
    return os.path.join(path, found[0])


def check_requirements() -> None:
    """Raise ImportError naming the missing packages of the ``gguf`` extra, if any."""
    missing = [p for p in REQUIRED_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(f"loading a GGUF checkpoint needs the packages {', '.join(REQUIRED_PACKAGES)}; "
                          f"missing: {', '.join(missing)}. Install them with {INSTALL_HINT}")


def _field(reader, key: str) -> Any:
    """A scalar or string metadata value of a ``gguf.GGUFReader``, None when absent."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if field.types and int(field.types[0]) == 8:  # GGUFValueType.STRING
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def _quantization(reader, tensor_types: Counter) -> str:
    """The file's quantisation type: ``general.file_type`` (e.g. Q4_1, Q4_K_M), else the commonest
    type among its 2-D tensors."""
    import gguf

    file_type = _field(reader, "general.file_type")
    try:
        name = gguf.LlamaFileType(file_type).name
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ValueError, TypeError):
        pass
    matrices = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    return (matrices or tensor_types).most_common(1)[0][0]


def inspect_gguf(path: str) -> dict:
    """Read a GGUF's header (no tensor data): architecture, name, quantisation, tensor types.

    Returns:
      ``{"architecture": str, "name": str | None, "quantization": str (e.g. "Q4_1"),
      "tensor_types": {type: count}, "num_tensors": int, "has_tokenizer": bool}``.

    Raises:
      ImportError: the ``gguf`` package is missing.
      ValueError: the file is not a readable GGUF, or is shorter than its tensors need (truncated).
    """
    check_requirements()
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        architecture = _field(reader, "general.architecture")
    except Exception as e:  # bad magic, short header, cut-off tensor data, ...
        raise ValueError(f"{path}: not a readable GGUF file (corrupt or truncated?): "
                         f"{type(e).__name__}: {e}") from e
    size = os.path.getsize(path)
    if end > size:
        raise ValueError(f"{path}: truncated GGUF file: {size} bytes, its tensors need {end}")
    if not architecture:
        raise ValueError(f"{path}: GGUF file without general.architecture")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {"architecture": architecture, "name": _field(reader, "general.name"),
            "quantization": _quantization(reader, types), "tensor_types": dict(types),
            "num_tensors": len(reader.tensors),
            "has_tokenizer": "tokenizer.ggml.model" in reader.fields}


def check_architecture(info: dict, path: str) -> None:
    """Raise ValueError unless jaxgrad has a model for the GGUF's ``general.architecture``."""
    arch = info["architecture"]
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported by jaxgrad; supported GGUF "
            f"architectures: {', '.join(GGUF_ARCHITECTURES)} (Hugging Face model types llama, "
            "mistral, qwen2, gemma3_text; Mistral GGUFs are written as 'llama')")


def cache_path(gguf_path: str, cache_dir: str | None = None) -> str:
    """Where the converted directory of ``gguf_path`` lives: ``<cache_dir>/<stem>.hf``, with
    ``cache_dir`` defaulting to ``$JAXGRAD_GGUF_CACHE``, else the GGUF's own directory."""
    root = cache_dir or os.environ.get(CACHE_ENV) or os.path.dirname(os.path.abspath(gguf_path))
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(os.path.expanduser(root), stem + ".hf")


def read_record(directory: str) -> dict | None:
    """The conversion record of a cache directory, None when absent or unreadable."""
    try:
        with open(os.path.join(directory, RECORD_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def is_current(record: dict | None, gguf_path: str) -> bool:
    """Whether a cache record was made from this very GGUF file (and this conversion format).

    Same size and modification time count as unchanged; a different time with the same size is
    settled by the sha256 (and the record's time updated, so the next check is quick again).
    """
    if not record or record.get("cache_format") != CACHE_FORMAT:
        return False
    size, mtime_ns = _stat(gguf_path)
    if record.get("size") != size:
        return False
    if record.get("mtime_ns") == mtime_ns:
        return True
    return record.get("sha256") == file_sha256(gguf_path)


def _refresh_mtime(directory: str, record: dict, gguf_path: str) -> None:
    """Store the GGUF's current modification time in a current record (atomically)."""
    mtime_ns = _stat(gguf_path)[1]
    if record.get("mtime_ns") == mtime_ns:
        return
    tmp = os.path.join(directory, RECORD_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**record, "mtime_ns": mtime_ns}, f, indent=2)
    os.replace(tmp, os.path.join(directory, RECORD_FILE))


def _versions() -> dict:
    import transformers

    return {"transformers_version": transformers.__version__,
            "gguf_version": importlib.metadata.version("gguf")}


def make_record(gguf_path: str, info: dict) -> dict:
    """The provenance/cache record of a conversion of ``gguf_path`` (inspected as ``info``)."""
    size, mtime_ns = _stat(gguf_path)
    return {"cache_format": CACHE_FORMAT, "gguf_file": os.path.abspath(gguf_path), "size": size,
            "mtime_ns": mtime_ns, "sha256": file_sha256(gguf_path),
            "architecture": info["architecture"], "name": info["name"],
            "quantization": info["quantization"], "tensor_types": info["tensor_types"],
            "dequantized_to": "float32", **_versions()}


def _load_torch(gguf_path: str, with_tokenizer: bool):
    """transformers' float32 torch model (and tokenizer) for a GGUF, its quantizer cleared."""
    import torch
    import transformers

    folder, name = os.path.split(os.path.abspath(gguf_path))
    kwargs = {}
    if hasattr(transformers, "GgufConfig"):  # transformers 5: insist on a dense float32 model
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, **kwargs)
    # save_pretrained refuses a model loaded through the GGUF quantizer until it is cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = (transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
                 if with_tokenizer else None)
    return model, tokenizer


def _update_json(path: str, update) -> None:
    with open(path) as f:
        data = json.load(f)
    update(data)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _fix_config(cfg: dict, record: dict) -> None:
    """config.json: no quantizer, float32, ``rope_theta`` at the top level, the GGUF provenance."""
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta")
    if theta is not None:
        cfg["rope_theta"] = theta
    if cfg.get("model_type") == "gemma3_text":  # per layer type; transformers 4's two names
        for layer_type, key in (("full_attention", "rope_theta"),
                                ("sliding_attention", "rope_local_base_freq")):
            theta = (rope.get(layer_type) or {}).get("rope_theta")
            if theta is not None:
                cfg[key] = theta
    cfg["gguf_source"] = {k: v for k, v in record.items() if k != "mtime_ns"}


def _fix_tokenizer_config(cfg: dict) -> None:
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"


def write_checkpoint(gguf_path: str, info: dict, out: str) -> None:
    """Convert ``gguf_path`` into a float32 Hugging Face directory ``out`` (config.json,
    model.safetensors, tokenizer files when the GGUF has a tokenizer, and the record)."""
    record = make_record(gguf_path, info)  # first: a file changed meanwhile shows as stale
    model, tokenizer = _load_torch(gguf_path, info["has_tokenizer"])
    model.save_pretrained(out, safe_serialization=True)
    _update_json(os.path.join(out, "config.json"), lambda c: _fix_config(c, record))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        _update_json(os.path.join(out, "tokenizer_config.json"), _fix_tokenizer_config)
    with open(os.path.join(out, RECORD_FILE), "w") as f:
        json.dump(record, f, indent=2)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_permissions(directory: str) -> None:
    """The modes a plain mkdir/open would give (mkdtemp makes 0700, some writers 0600), so the
    cache is readable by whoever can read the GGUF."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, 0o666 & ~mask)


def _install(tmp: str, target: str, gguf_path: str) -> None:
    """Rename the finished ``tmp`` to ``target``, replacing a stale cache; when a concurrent
    conversion got there first with a current cache, keep that one and drop ours."""
    if is_current(read_record(target), gguf_path):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if os.path.isdir(target):  # stale: moved aside, then deleted once ours is in place
        old = tempfile.mkdtemp(prefix=os.path.basename(target) + ".old-", dir=os.path.dirname(target))
        os.rename(target, os.path.join(old, "stale"))
    try:
        os.rename(tmp, target)
    except OSError:
        if not is_current(read_record(target), gguf_path):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _convert(gguf_path: str, info: dict, target: str) -> None:
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=parent)
    try:
        write_checkpoint(gguf_path, info, tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{gguf_path}: conversion of the GGUF file failed (corrupt file, or a "
                         f"variant transformers cannot read?): {type(e).__name__}: {e}") from e
    except BaseException:  # KeyboardInterrupt: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _open_permissions(tmp)
    _install(tmp, target, gguf_path)


def gguf_to_hf(gguf_path: str, cache_dir: str | None = None, *, force: bool = False) -> str:
    """The float32 Hugging Face directory converted from ``gguf_path``, converting it if needed.

    Args:
      gguf_path: a ``.gguf`` file (any quantisation transformers can dequantise: F32, F16, Q8_0,
        Q4_0/1, K-quants, ...).
      cache_dir: where to keep the converted directory (``<cache_dir>/<stem>.hf``); default
        ``$JAXGRAD_GGUF_CACHE``, else next to the GGUF.
      force: convert again even when the cache is current.

    Returns:
      The directory: config.json (with ``gguf_source``), model.safetensors (float32), tokenizer
      files, gguf_source.json.

    Raises:
      ImportError: gguf, accelerate or torch is missing (the ``gguf`` extra).
      ValueError: corrupt or truncated file, unsupported architecture, failed conversion.
      FileExistsError: the cache path holds a directory that is not a conversion of ours.
    """
    gguf_path = os.path.abspath(os.path.expanduser(gguf_path))
    target = cache_path(gguf_path, cache_dir)
    record = read_record(target)
    if not force and is_current(record, gguf_path):
        _refresh_mtime(target, record, gguf_path)
        return target
    if os.path.exists(target) and record is None:
        raise FileExistsError(f"{target} exists and is not a GGUF conversion made by jaxgrad (no "
                              f"{RECORD_FILE}); move it away or pass another cache_dir")
    info = inspect_gguf(gguf_path)  # raises before the long conversion
    check_architecture(info, gguf_path)
    print(f"[jaxgrad] converting {os.path.basename(gguf_path)} ({info['architecture']}, "
          f"{info['quantization']}) to a float32 Hugging Face checkpoint in {target} (once)",
          file=sys.stderr, flush=True)
    _convert(gguf_path, info, target)
    return target


def gguf_source(directory: str) -> dict | None:
    """The GGUF provenance recorded in a checkpoint's config.json (None for an ordinary one):
    file, sha256, quantisation, tensor types, ``dequantized_to`` and the library versions.

    Args:
      directory: a Hugging Face checkpoint directory (as :func:`gguf_to_hf` writes).

    Returns:
      The ``gguf_source`` dict of its ``config.json``; None when absent, or when the file is
      missing or not JSON (never raises for those).
    """
    try:
        with open(os.path.join(directory, "config.json")) as f:
            return json.load(f).get("gguf_source")
    except (OSError, ValueError):
        return None


def describe_gguf_source(directory: str) -> str | None:
    """One line for reports, e.g. ``weights dequantised to float32 from the Q4_1 GGUF
    SmolLM2-135M-Instruct.Q4_1.gguf``; None for a checkpoint that did not come from a GGUF.

    Args:
      directory: a Hugging Face checkpoint directory.

    Returns:
      A str, or None (as :func:`gguf_source`).
    """
    src = gguf_source(directory)
    if not src:
        return None
    return (f"weights dequantised to {src.get('dequantized_to', 'float32')} from the "
            f"{src.get('quantization')} GGUF {os.path.basename(src.get('gguf_file', '?'))}")


__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)
