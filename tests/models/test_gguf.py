"""GGUF checkpoints through ``load_pretrained``: parity with the original torch models, the
tokenizer, the conversion cache (reuse, rebuild, atomicity) and the errors.

The fixtures in tests/fixtures/tiny-gguf/ come from tests/fixtures/make_gguf_fixture.py: tiny
random torch Llama (tied, GQA) and Qwen2 (biases, untied) models written as GGUF the way
llama.cpp writes them (F32, and Q8_0 for the Llama), with the ORIGINAL torch models' logits on a
right-padded batch. Every test works on copies in tmp_path, so no cache lands in the repository.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import transformers

from helpers import fixture
from jaxgrad.models import describe_gguf_source, gguf_source, load_pretrained
from jaxgrad.models import gguf as jgguf

FIXTURE = fixture("tiny-gguf")
LLAMA, LLAMA_Q8, QWEN = "tiny-llama-f32.gguf", "tiny-llama-q8_0.gguf", "tiny-qwen2-f32.gguf"
ATOL = 1e-4  # float32 parity, as in tests/models/test_hub.py


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


def copy(name, directory, as_name=None):
    os.makedirs(directory, exist_ok=True)
    dst = os.path.join(directory, as_name or name)
    shutil.copyfile(os.path.join(FIXTURE, name), dst)
    return dst


def max_err(model, ref, key):
    logits = np.asarray(model(ref["input_ids"], ref["attention_mask"]))
    assert logits.shape == ref[key].shape
    return float(np.abs(logits - ref[key])[ref["attention_mask"] > 0].max())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(gguf path, model, tokenizer) of the F32 Llama GGUF, converted once for the module."""
    path = copy(LLAMA, tmp_path_factory.mktemp("llama"))
    model, tok = load_pretrained(path)
    return path, model, tok


@pytest.fixture
def forbid_conversion(monkeypatch):
    """Make any conversion fail loudly: a load that should reuse the cache must not get here."""
    def fail(*args, **kwargs):
        raise AssertionError("converted again")
    monkeypatch.setattr(jgguf, "write_checkpoint", fail)


def count_conversions(monkeypatch):
    calls = []
    real = jgguf.write_checkpoint

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(jgguf, "write_checkpoint", counted)
    return calls


# --- parity -------------------------------------------------------------------------------------

def test_llama_gguf_logits_match_original_torch(llama, ref):
    _, model, _ = llama
    real = ref["attention_mask"] > 0
    assert np.abs(ref["logits"][real]).max() > 1.0, "reference logits too small to test anything"
    err = max_err(model, ref, "logits")
    assert err < ATOL, f"max |ours - torch| = {err:.2e}"
    assert model.config.tie_word_embeddings and model.lm_head is None
    assert model.config.rope_theta == 1e5 and model.config.num_key_value_heads == 2
    assert model.config.rms_norm_eps == pytest.approx(1e-5)


def test_tokenizer_encodes_like_original(llama, ref):
    _, _, tok = llama
    for text, ids, mask in zip(ref["texts"], ref["input_ids"], ref["attention_mask"]):
        assert tok(str(text), add_special_tokens=False).input_ids == ids[mask > 0].tolist(), text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                             "<|endoftext|>")
    assert tok.pad_token_id == 0
    assert tok.decode(ref["input_ids"][0]) == str(ref["texts"][0])


def test_q8_0_gguf_is_dequantised_by_transformers(tmp_path, ref):
    model, _ = load_pretrained(copy(LLAMA_Q8, tmp_path))
    # Exact against the torch model holding gguf.quants' dequantised Q8_0 weights ...
    assert max_err(model, ref, "logits_q8_0") < ATOL
    # ... and near, but visibly not equal to, the original float32 model.
    assert 1e-3 < max_err(model, ref, "logits") < 0.5
    src = gguf_source(str(tmp_path / "tiny-llama-q8_0.hf"))
    assert src["quantization"] == "Q8_0" and src["tensor_types"] == {"Q8_0": 15, "F32": 5}


def test_qwen2_gguf_logits_match_original_torch(tmp_path, ref):
    model, tok = load_pretrained(copy(QWEN, tmp_path))
    assert max_err(model, ref, "logits_qwen2") < ATOL
    assert model.config.model_type == "qwen2" and model.config.attention_bias
    assert model.lm_head is not None  # the file has an `output` tensor: untied
    assert tok is not None


def test_directory_with_one_gguf(tmp_path, ref):
    copy(LLAMA, tmp_path)
    model, _ = load_pretrained(str(tmp_path))
    assert max_err(model, ref, "logits") < ATOL
    assert os.path.isfile(tmp_path / "tiny-llama-f32.hf" / "model.safetensors")


# --- the converted directory ----------------------------------------------------------------------

def test_converted_directory_records_its_source(llama):
    path, _, _ = llama
    out = os.path.splitext(path)[0] + ".hf"
    cfg = json.loads(Path(out, "config.json").read_text())
    # transformers 4.57 reads rope_theta only at the top level; 5.x writes rope_parameters.
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 1e5
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    tok_cfg = json.loads(Path(out, "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    src = cfg["gguf_source"]
    assert src["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert src["size"] == os.path.getsize(path) and src["gguf_file"] == path
    assert (src["architecture"], src["quantization"], src["dequantized_to"]) == ("llama", "F32",
                                                                                 "float32")
    assert src["transformers_version"] == transformers.__version__
    assert src["gguf_version"] == importlib.metadata.version("gguf")
    assert jgguf.read_record(out)["sha256"] == src["sha256"]
    assert describe_gguf_source(out) == ("weights dequantised to float32 from the F32 GGUF "
                                         "tiny-llama-f32.gguf")
    assert gguf_source(os.path.join(FIXTURE, "..", "tiny-llama")) is None
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp-" in f or ".old-" in f]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700
    assert os.stat(os.path.join(out, "model.safetensors")).st_mode & 0o777 == 0o666 & ~mask


def test_cache_is_reused(llama, ref, forbid_conversion):
    path, _, _ = llama
    model, _ = load_pretrained(path)
    assert max_err(model, ref, "logits") < ATOL
    # A new modification time with the same bytes: the sha256 says unchanged, the record learns it.
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    load_pretrained(path, with_tokenizer=False)
    assert jgguf.read_record(os.path.splitext(path)[0] + ".hf")["mtime_ns"] == 1_000_000_000


def test_cache_is_rebuilt_when_the_file_changes(tmp_path, ref, monkeypatch):
    path = copy(LLAMA, tmp_path)
    load_pretrained(path)
    out = tmp_path / "tiny-llama-f32.hf"
    old_sha = jgguf.read_record(str(out))["sha256"]
    calls = count_conversions(monkeypatch)
    copy(LLAMA_Q8, tmp_path, as_name=LLAMA)  # another file under the same name
    model, _ = load_pretrained(path)
    assert calls == [path]
    assert max_err(model, ref, "logits_q8_0") < ATOL
    record = jgguf.read_record(str(out))
    assert record["sha256"] != old_sha and record["quantization"] == "Q8_0"
    assert sorted(os.listdir(tmp_path)) == ["tiny-llama-f32.gguf", "tiny-llama-f32.hf"]


def test_same_size_new_bytes_are_rebuilt(tmp_path, monkeypatch):
    path = copy(LLAMA, tmp_path)
    load_pretrained(path, with_tokenizer=False)
    data = bytearray(Path(path).read_bytes())
    data[-1] ^= 0xFF  # last byte of the last tensor: same size, different content
    stat = os.stat(path)
    Path(path).write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    calls = count_conversions(monkeypatch)
    load_pretrained(path, with_tokenizer=False)
    assert calls == [path]


def test_interrupted_conversion_leaves_nothing_trusted(tmp_path, monkeypatch, ref):
    path = copy(LLAMA, tmp_path)
    real = jgguf.write_checkpoint

    def interrupted(gguf_path, info, out):
        real(gguf_path, info, out)  # everything written, then killed before the rename
        raise KeyboardInterrupt
    monkeypatch.setattr(jgguf, "write_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_pretrained(path)
    assert os.listdir(tmp_path) == ["tiny-llama-f32.gguf"]

    def broken(gguf_path, info, out):
        Path(out, "config.json").write_text("{}")
        raise RuntimeError("disk full")
    monkeypatch.setattr(jgguf, "write_checkpoint", broken)
    with pytest.raises(ValueError, match=r"tiny-llama-f32\.gguf: conversion .* disk full"):
        load_pretrained(path)
    assert os.listdir(tmp_path) == ["tiny-llama-f32.gguf"]
    monkeypatch.setattr(jgguf, "write_checkpoint", real)
    model, _ = load_pretrained(path)
    assert max_err(model, ref, "logits") < ATOL


def test_concurrent_conversion_that_finished_first_is_kept(tmp_path, monkeypatch):
    path = copy(LLAMA, tmp_path)
    target = str(tmp_path / "tiny-llama-f32.hf")
    real = jgguf.write_checkpoint

    def racing(gguf_path, info, out):
        real(gguf_path, info, out)
        shutil.copytree(out, target)  # another process installs its conversion meanwhile
        Path(target, "marker").touch()
    monkeypatch.setattr(jgguf, "write_checkpoint", racing)
    load_pretrained(path, with_tokenizer=False)
    assert os.path.isfile(os.path.join(target, "marker"))  # theirs kept, ours dropped
    assert sorted(os.listdir(tmp_path)) == ["tiny-llama-f32.gguf", "tiny-llama-f32.hf"]


def test_cache_dir_argument_and_environment(tmp_path, monkeypatch):
    path = copy(LLAMA, tmp_path / "models")
    load_pretrained(path, with_tokenizer=False, gguf_cache_dir=str(tmp_path / "cache"))
    assert jgguf.read_record(str(tmp_path / "cache" / "tiny-llama-f32.hf"))["gguf_file"] == path
    monkeypatch.setenv(jgguf.CACHE_ENV, str(tmp_path / "env-cache"))
    load_pretrained(path, with_tokenizer=False)
    assert os.path.isfile(tmp_path / "env-cache" / "tiny-llama-f32.hf" / jgguf.RECORD_FILE)
    assert os.listdir(tmp_path / "models") == ["tiny-llama-f32.gguf"]


def test_foreign_directory_at_the_cache_path_is_not_touched(tmp_path):
    path = copy(LLAMA, tmp_path)
    (tmp_path / "tiny-llama-f32.hf").mkdir()
    (tmp_path / "tiny-llama-f32.hf" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a GGUF conversion made by jaxgrad"):
        load_pretrained(path)
    assert (tmp_path / "tiny-llama-f32.hf" / "mine.txt").read_text() == "keep"


# --- errors ---------------------------------------------------------------------------------------

def write_other_arch(path, arch="gpt2"):
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture_is_named_before_converting(tmp_path, forbid_conversion):
    write_other_arch(tmp_path / "other.gguf", arch="falcon")
    with pytest.raises(ValueError, match=r"other\.gguf: GGUF architecture 'falcon' is not supported "
                                         r"by jaxgrad; supported GGUF architectures: llama, qwen2, gemma3"):
        load_pretrained(str(tmp_path / "other.gguf"))
    assert os.listdir(tmp_path) == ["other.gguf"]


@pytest.mark.parametrize("cut", [0.5, 0.999, 0.01])
def test_truncated_file_is_named(tmp_path, cut, forbid_conversion):
    data = Path(FIXTURE, LLAMA).read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(ValueError, match=r"cut\.gguf: (truncated GGUF|not a readable GGUF)"):
        load_pretrained(str(path))


def test_not_a_gguf_file_is_named(tmp_path, forbid_conversion):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF" * 10)
    with pytest.raises(ValueError, match=r"junk\.gguf: not a readable GGUF file"):
        load_pretrained(str(path))


def test_directory_with_no_or_several_gguf_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json and no .gguf file"):
        load_pretrained(str(tmp_path))
    copy(LLAMA, tmp_path)
    copy(LLAMA_Q8, tmp_path)
    with pytest.raises(ValueError, match=r"2 \.gguf files \(tiny-llama-f32\.gguf, "
                                         r"tiny-llama-q8_0\.gguf\) and no config\.json"):
        load_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="GGUF file .*missing.gguf.* does not exist"):
        load_pretrained(str(tmp_path / "missing.gguf"))


def test_missing_extra_is_named(tmp_path, monkeypatch, ref):
    path = copy(LLAMA, tmp_path / "new")
    done = copy(LLAMA, tmp_path / "converted")
    load_pretrained(done, with_tokenizer=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "accelerate") else real(name, *a))
    with pytest.raises(ImportError, match=r'missing: accelerate, torch\. Install them with '
                                          r'pip install -e "\.\[gguf\]"'):
        load_pretrained(path)
    assert os.listdir(tmp_path / "new") == ["tiny-llama-f32.gguf"]
    # A current cache is an ordinary Hugging Face directory: no extra needed to load it.
    model, _ = load_pretrained(done, with_tokenizer=False)
    assert max_err(model, ref, "logits") < ATOL
