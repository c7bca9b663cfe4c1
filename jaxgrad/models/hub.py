"""Load Hugging Face checkpoints (local directory or Hub name) into our Flax NNX modules.

``load_pretrained(name_or_path, dtype=..., lora=...)`` reads ``config.json``, picks the module by
``model_type`` (Llama family or T5 family), builds it abstractly (``nnx.eval_shape``: no random
initialisation of a billion parameters), and fills every parameter from safetensors, a single
``model.safetensors`` or a sharded ``model.safetensors.index.json``, tensor by tensor. Every
expected tensor must be present with its shape; extra tensors are errors too, apart from known
aliases (tied embeddings saved twice, rotary caches). The tokenizer is loaded with
``transformers.AutoTokenizer`` (imported lazily) when the directory has tokenizer files.

A GGUF checkpoint (a ``.gguf`` file, or a directory holding exactly one and no config.json) is
first converted once into a cached float32 Hugging Face directory (``jaxgrad.models.gguf``), which
is then loaded like any other.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrad.models.gguf import find_gguf, gguf_to_hf
from jaxgrad.models.layers import named_variables
from jaxgrad.models.llama import LlamaConfig, LlamaForCausalLM
from jaxgrad.models.lora import LoraConfig, apply_lora
from jaxgrad.models.t5 import T5Config, T5ForConditionalGeneration

LLAMA_TYPES = ("llama", "mistral", "qwen2")
T5_TYPES = ("t5",)
SUPPORTED = LLAMA_TYPES + T5_TYPES
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
                   "vocab.json")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _as_dtype(dtype: Any):
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; expected one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    return dtype


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no config.json; expected a Hugging Face model directory")
    with open(path) as f:
        return json.load(f)


def config_from_hf(cfg: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, source: str = "config"):
    """Our typed config (LlamaConfig or T5Config) for a Hugging Face config dictionary."""
    model_type = cfg.get("model_type")
    if model_type in LLAMA_TYPES:
        return LlamaConfig.from_hf(cfg, dtype=dtype, param_dtype=param_dtype)
    if model_type in T5_TYPES:
        return T5Config.from_hf(cfg, dtype=dtype, param_dtype=param_dtype)
    archs = cfg.get("architectures")
    raise ValueError(f"{source}: unsupported architecture (model_type={model_type!r}, "
                     f"architectures={archs}); supported model types: {', '.join(SUPPORTED)}")


def build_model(config, *, seed: int = 0) -> nnx.Module:
    """A randomly initialised model for a typed config (training from scratch, tests)."""
    rngs = nnx.Rngs(params=seed)
    if isinstance(config, LlamaConfig):
        return LlamaForCausalLM(config, rngs=rngs)
    if isinstance(config, T5Config):
        return T5ForConditionalGeneration(config, rngs=rngs)
    raise TypeError(f"build_model: expected LlamaConfig or T5Config, got {type(config).__name__}")


def _weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that are missing: {missing}")
        return [os.path.join(directory, s) for s in shards]
    if os.path.isfile(single):
        return [single]
    others = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".h5", ".msgpack"))]
    hint = f" (found {others}: convert them to safetensors first)" if others else ""
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def _aliases(model: nnx.Module) -> set[str]:
    """Tensor names a checkpoint may carry that duplicate a parameter we hold once."""
    names = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if getattr(model, "lm_head", None) is None:
        names.add("lm_head.weight")
    return names


def load_weights(model: nnx.Module, files: list[str], *, source: str) -> nnx.Module:
    """Fill every parameter of ``model`` from safetensors ``files`` (strict, by name)."""
    from safetensors import safe_open

    expected = {k: v for k, v in named_variables(model).items() if not isinstance(v, nnx.LoRAParam)}
    aliases = _aliases(model)
    found: dict[str, tuple[str, tuple]] = {}
    for path in files:
        with safe_open(path, framework="flax") as f:
            for key in f.keys():
                found[key] = (path, tuple(f.get_slice(key).get_shape()))
    unexpected = sorted(k for k in found if k not in expected and k not in aliases
                        and not k.endswith("rotary_emb.inv_freq"))
    missing = sorted(k for k in expected if k not in found)
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    bad = [f"{k}: checkpoint {found[k][1]} vs model {tuple(v.shape)}" for k, v in expected.items()
           if k in found and found[k][1] != tuple(v.shape)]
    if bad:
        problems.append(f"mis-shaped tensors: {bad}")
    if problems:
        raise ValueError(f"{source}: checkpoint does not fit {type(model).__name__}; "
                         + "; ".join(problems))
    by_file: dict[str, list[str]] = {}
    for k in expected:
        by_file.setdefault(found[k][0], []).append(k)
    for path, keys in by_file.items():
        with safe_open(path, framework="flax") as f:
            for k in keys:
                var = expected[k]
                var.value = jnp.asarray(f.get_tensor(k), dtype=var.value.dtype)
    return model


def _resolve(name_or_path: str, revision: str | None) -> str:
    path = os.path.expanduser(str(name_or_path))
    if os.path.isdir(path):
        return path
    if path.lower().endswith(".gguf"):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    # Hub names are "name" or "org/name"; anything that looks like a filesystem path is local.
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise OSError(f"{name_or_path!r} is not a local directory and HF_HUB_OFFLINE is set: "
                      "cannot download it from the Hugging Face Hub; pass a local model directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            str(name_or_path), revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"])
    except Exception as e:  # network failure, unknown repo, gated repo, ...
        raise OSError(f"{name_or_path!r} is not a local directory and could not be fetched from the "
                      f"Hugging Face Hub (offline or unknown repository?): {type(e).__name__}: {e}") from e


def load_tokenizer(directory: str):
    """``AutoTokenizer`` for the directory, or None when it holds no tokenizer files."""
    if not any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def resolve_checkpoint(name_or_path: str, *, revision: str | None = None,
                       gguf_cache_dir: str | None = None) -> str:
    """The Hugging Face directory ``load_pretrained`` reads for ``name_or_path``: the local
    directory itself, the GGUF's converted cache (converting it once), or a Hub snapshot."""
    path = os.path.expanduser(str(name_or_path))
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return gguf_to_hf(gguf_file, cache_dir=gguf_cache_dir)
    return _resolve(name_or_path, revision)


def load_pretrained(name_or_path: str, *, dtype: Any = jnp.float32, param_dtype: Any = None,
                    lora: LoraConfig | None = None, revision: str | None = None,
                    with_tokenizer: bool = True, gguf_cache_dir: str | None = None):
    """Load a Llama-family or T5-family checkpoint (Hugging Face or GGUF) as a Flax NNX model.

    Args:
      name_or_path: a local Hugging Face model directory; a Hub repository name (needs network);
        or a GGUF checkpoint: a ``.gguf`` file, or a directory with exactly one ``.gguf`` and no
        config.json (architectures llama, qwen2; needs ``pip install -e ".[gguf]"``). A GGUF is
        dequantised to float32 by transformers once and cached as a Hugging Face directory
        (``<stem>.hf/`` next to it; see ``jaxgrad.models.gguf``), rebuilt when the file changes.
        Its config.json records the GGUF's quantisation under ``"gguf_source"``.
      dtype: compute dtype, ``float32`` (default) or ``bfloat16``.
      param_dtype: storage dtype of the base weights (default float32; LoRA weights are float32).
      lora: attach LoRA adapters with this config (B = 0: outputs unchanged).
      revision: Hub revision.
      with_tokenizer: load the tokenizer as well.
      gguf_cache_dir: where converted GGUFs go (default ``$JAXGRAD_GGUF_CACHE``, else next to
        the file).

    Returns:
      ``(model, tokenizer)``; tokenizer is None when the checkpoint has no tokenizer.

    Raises:
      FileNotFoundError: no such directory or file; a directory with neither config.json nor .gguf.
      ValueError: unsupported architecture, tensors that do not fit; for GGUF also a corrupt or
        truncated file, or a directory with several .gguf files.
      ImportError: a GGUF without the ``gguf`` extra (gguf, accelerate, torch) installed.
      OSError: a Hub name while offline.

    Example:
      >>> model, tok = load_pretrained("tests/fixtures/tiny-llama", lora=LoraConfig(rank=4))
      >>> logits = model(input_ids, attention_mask)                     # [B, L, V] float32
      >>> model, tok = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")
    """
    directory = resolve_checkpoint(name_or_path, revision=revision, gguf_cache_dir=gguf_cache_dir)
    hf = read_config(directory)
    config = config_from_hf(hf, dtype=_as_dtype(dtype),
                            param_dtype=_as_dtype(param_dtype or jnp.float32),
                            source=os.path.join(directory, "config.json"))
    files = _weight_files(directory)
    model = nnx.eval_shape(lambda: build_model(config))
    # eval_shape leaves ShapeDtypeStructs; give every variable a concrete zero so assignment works.
    for var in named_variables(model).values():
        var.value = np.zeros(var.value.shape, var.value.dtype)
    load_weights(model, files, source=directory)
    if lora is not None:
        apply_lora(model, lora)
    tokenizer = load_tokenizer(directory) if with_tokenizer else None
    return model, tokenizer


def save_pretrained(model: nnx.Module, directory: str | os.PathLike, hf_config: dict,
                    tokenizer=None) -> None:
    """Write ``model``'s base weights as a Hugging Face checkpoint (config.json + safetensors).

    ``hf_config`` is the Hugging Face config dictionary the model was built from (the inverse of
    :func:`config_from_hf`); LoRA adapters are not included (see ``save_peft_adapter``). The
    result loads with :func:`load_pretrained` and with ``transformers`` in torch.
    """
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {k: np.asarray(v.value, np.float32) for k, v in named_variables(model).items()
               if not isinstance(v, nnx.LoRAParam)}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
