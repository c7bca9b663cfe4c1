"""Load Hugging Face checkpoints (local directory or Hub name) into our Flax NNX modules.

``load_pretrained(name_or_path, dtype=..., lora=...)`` reads ``config.json``, picks the module by
``model_type`` (Llama family or T5 family), builds it abstractly (``nnx.eval_shape``: no random
initialisation of a billion parameters), and fills every parameter from safetensors, a single
``model.safetensors`` or a sharded ``model.safetensors.index.json``, tensor by tensor. Every
expected tensor must be present with its shape; extra tensors are errors too, apart from known
aliases (tied embeddings saved twice with equal values, rotary caches, the cross-attention bias
table transformers ignores). The tokenizer is loaded with ``transformers.AutoTokenizer``
(imported lazily) when the directory has tokenizer files.

Config keys are read by each family's ``from_hf`` (:data:`FAMILIES`) under the rules of
``docs/config_fields.md``: computed exactly, or refused by name. Tied output embeddings follow
transformers 5's ``PreTrainedModel.tie_weights``: a checkpoint whose ``lm_head.weight`` differs
from the input embeddings is loaded untied whatever the config says; a tied checkpoint may hold
either of the two tensors. dtypes follow one rule (:func:`jaxgrad.models.hf_config.resolve_dtype`):
float32 or bfloat16, everything else refused by name.

A GGUF checkpoint (a ``.gguf`` file, or a directory holding exactly one and no config.json) is
first converted once into a cached float32 Hugging Face directory (``jaxgrad.models.gguf``), which
is then loaded like any other.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrad.models.gguf import find_gguf, gguf_to_hf
from jaxgrad.models.layers import named_variables
from jaxgrad.models.hf_config import resolve_dtype
from jaxgrad.models.lora import LoraConfig, apply_lora
from jaxgrad.models.t5 import T5Config

# model_type -> (module, config class, model class). A family's module is imported when a
# checkpoint of it is first loaded, so `import jaxgrad.models` stays light. A config class reads
# config.json with ``from_hf(cfg, dtype=, param_dtype=, source=)``; a model class is built as
# ``ModelClass(config, rngs=)`` and names its checkpoint keys (BASE_PREFIX, EMBED_KEYS,
# OUTPUT_HEAD, IGNORED_KEYS) and LoRA defaults (LORA_TARGETS, PEFT_TARGETS).
FAMILIES: dict[str, tuple[str, str, str]] = {
    "llama": ("jaxgrad.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("jaxgrad.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("jaxgrad.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "t5": ("jaxgrad.models.t5", "T5Config", "T5ForConditionalGeneration"),
    "gpt2": ("jaxgrad.models.gpt2", "GPT2Config", "GPT2LMHeadModel"),
    "gpt_neox": ("jaxgrad.models.gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "gemma3_text": ("jaxgrad.models.gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM"),
}
SUPPORTED = tuple(FAMILIES)
LLAMA_TYPES = tuple(t for t, f in FAMILIES.items() if f[1] == "LlamaConfig")
T5_TYPES = ("t5",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
                   "vocab.json")


def family_classes(model_type: str) -> tuple[type, type]:
    """``(config class, model class)`` of a Hugging Face ``model_type`` (KeyError if unknown)."""
    module, config_name, model_name = FAMILIES[model_type]
    mod = importlib.import_module(module)
    return getattr(mod, config_name), getattr(mod, model_name)


def model_class(config) -> type:
    """The model class built from a typed config (the registry entry of its config class)."""
    for module, config_name, model_name in FAMILIES.values():
        if type(config).__module__ == module and type(config).__name__ == config_name:
            return getattr(importlib.import_module(module), model_name)
    raise TypeError(f"build_model: {type(config).__name__} is no jaxgrad model config; expected "
                    f"one of {sorted({f[1] for f in FAMILIES.values()})}")


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no config.json; expected a Hugging Face model directory")
    with open(path) as f:
        return json.load(f)


def config_from_hf(cfg: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, source: str = "config"):
    """Our typed config (``LlamaConfig``, ``T5Config``, ``GPT2Config``, ...) for a Hugging Face
    config dictionary, chosen by its ``model_type`` (:data:`FAMILIES`).

    ``dtype`` / ``param_dtype``: float32 or bfloat16 (a name or a numpy/JAX dtype); anything else
    raises ValueError. Config values jaxgrad does not compute raise ValueError naming ``source``,
    the key and its value (docs/config_fields.md).

    Args:
      cfg: a ``config.json`` dictionary (``transformers.PretrainedConfig.to_dict()`` form).
      dtype: the computation dtype.
      param_dtype: the parameters' storage dtype.
      source: where ``cfg`` came from, for error messages (e.g. the file path).

    Returns:
      The family's typed config (``from_hf``).

    Raises:
      ValueError: an unsupported ``model_type``, a dtype other than float32/bfloat16, or a
        config value jaxgrad does not compute.
    """
    dtype = resolve_dtype(dtype, "dtype")
    param_dtype = resolve_dtype(param_dtype, "param_dtype")
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        archs = cfg.get("architectures")
        raise ValueError(f"{source}: unsupported architecture (model_type={model_type!r}, "
                         f"architectures={archs}); supported model types: {', '.join(SUPPORTED)}")
    config_cls, _ = family_classes(model_type)
    return config_cls.from_hf(cfg, dtype=dtype, param_dtype=param_dtype, source=source)


def build_model(config, *, seed: int = 0) -> nnx.Module:
    """A randomly initialised model for a typed config (training from scratch, tests).

    Args:
      config: a typed jaxgrad model config (``LlamaConfig``, ``T5Config``, ...).
      seed: the ``nnx.Rngs(params=seed)`` seed of the initialisation.

    Returns:
      The family's ``nnx.Module``, without LoRA adapters.

    Raises:
      TypeError: ``config`` is not a jaxgrad model config.
    """
    return model_class(config)(config, rngs=nnx.Rngs(params=seed))


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


def ignored_keys(model_cls: type, names) -> set[str]:
    """Checkpoint tensors transformers drops on load for this family (``IGNORED_KEYS``
    regexes, its ``_keys_to_ignore_on_load_unexpected``: attention-mask buffers, rotary caches)."""
    patterns = tuple(getattr(model_cls, "IGNORED_KEYS", ())) + (r"(.*\.)?rotary_emb\.inv_freq",)
    return {k for k in names if any(re.fullmatch(p, k) for p in patterns)}


def _aliases(model: nnx.Module) -> set[str]:
    """Tensor names a checkpoint may carry that duplicate a parameter we hold once (the default
    of :func:`load_weights`; :func:`load_pretrained` checks the duplicates' values instead)."""
    cls = type(model)
    names = set(getattr(cls, "EMBED_KEYS", ())[1:])
    head = getattr(cls, "OUTPUT_HEAD", "lm_head")
    if getattr(model, head, None) is None:
        names.add(f"{head}.weight")
    return names


def prefix_renames(model_cls: type, names) -> dict[str, str]:
    """``{our name: checkpoint name}`` for a checkpoint saved from the bare base model, whose keys
    lack the head model's ``base_model_prefix`` (GPT-2's ``h.0.attn.c_attn.weight`` for our
    ``transformer.h.0.attn.c_attn.weight``): transformers' own prefix rule on load."""
    prefix = getattr(model_cls, "BASE_PREFIX", "")
    names = list(names)
    if not prefix or any(k.startswith(prefix + ".") for k in names):
        return {}
    return {f"{prefix}.{k}": k for k in names}


def tensor_index(files: list[str]) -> dict[str, tuple[str, tuple]]:
    """``{tensor name: (file, shape)}`` over safetensors ``files`` (no data read)."""
    from safetensors import safe_open

    found: dict[str, tuple[str, tuple]] = {}
    for path in files:
        with safe_open(path, framework="flax") as f:
            for key in f.keys():
                found[key] = (path, tuple(f.get_slice(key).get_shape()))
    return found


def _equal(index: dict, a: str, b: str) -> bool:
    if index[a][1] != index[b][1]:
        return False
    from safetensors import safe_open

    def read(name):
        entry = index[name]  # (file, shape[, checkpoint name])
        with safe_open(entry[0], framework="numpy") as f:
            return f.get_tensor(entry[2] if len(entry) > 2 else name)

    return bool(np.array_equal(read(a), read(b)))


def resolve_tying(config, index: dict[str, tuple[str, tuple]], *, source: str):
    """``(config, renames, aliases)`` for a checkpoint, as transformers 5's ``tie_weights`` ties.

    ``index`` is keyed by our names (:func:`prefix_renames` applied). The model class names the
    input embedding (``EMBED_KEYS[0]``; T5's other two are copies) and the head (``OUTPUT_HEAD``):

    - tied config, the head present and different from the embedding: untied (the checkpoint
      wins; transformers warns and does not tie);
    - tied config, only one of the two tensors present: both read from it (``renames``: our
      name -> checkpoint name);
    - T5: transformers 5 always ties, so a T5 without ``lm_head.weight`` is tied whatever
      ``tie_word_embeddings`` says; ``encoder/decoder.embed_tokens.weight`` are accepted when
      equal to ``shared.weight`` and refused otherwise (separate tables are not implemented).

    ``aliases``: checkpoint tensors that duplicate one we read (equal values) or that
    transformers ignores (``IGNORED_KEYS``).
    """
    cls = model_class(config)
    renames: dict[str, str] = {}
    aliases: set[str] = ignored_keys(cls, index)
    head = f"{getattr(cls, 'OUTPUT_HEAD', 'lm_head')}.weight"
    embeds = tuple(getattr(cls, "EMBED_KEYS", ()))
    group = [k for k in embeds if k in index]
    if group:
        if group[0] != embeds[0]:
            renames[embeds[0]] = group[0]
        for other in group[1:]:
            if not _equal(index, group[0], other):
                raise ValueError(f"{source}: {other} differs from {group[0]}: separate "
                                 "encoder/decoder embedding tables are not supported")
            aliases.add(other)
    embed = group[0] if group else None
    if isinstance(config, T5Config) and head not in index and not config.tie_word_embeddings:
        config = dataclasses.replace(config, tie_word_embeddings=True)
    if config.tie_word_embeddings and head in index:
        if embed is None:
            renames[embeds[0]] = head
        elif _equal(index, embed, head):
            aliases.add(head)
        else:
            config = dataclasses.replace(config, tie_word_embeddings=False)
    return config, renames, aliases


def load_weights(model: nnx.Module, files: list[str], *, source: str,
                 renames: dict[str, str] | None = None, aliases: set[str] | None = None) -> nnx.Module:
    """Fill every parameter of ``model`` from safetensors ``files`` (strict, by name).

    ``renames`` maps a parameter name to the checkpoint tensor it is read from; ``aliases`` are
    checkpoint tensors accepted without being read (default: :func:`_aliases`).
    """
    from safetensors import safe_open

    renames = renames or {}
    aliases = _aliases(model) if aliases is None else set(aliases)
    expected = {k: v for k, v in named_variables(model).items() if not isinstance(v, nnx.LoRAParam)}
    found = tensor_index(files)
    wanted = {renames.get(k, k): k for k in expected}
    aliases |= ignored_keys(type(model), found)
    unexpected = sorted(k for k in found if k not in wanted and k not in aliases)
    missing = sorted(k for k in expected if renames.get(k, k) not in found)
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    bad = [f"{k}: checkpoint {found[renames.get(k, k)][1]} vs model {tuple(v.shape)}"
           for k, v in expected.items()
           if renames.get(k, k) in found and found[renames.get(k, k)][1] != tuple(v.shape)]
    if bad:
        problems.append(f"mis-shaped tensors: {bad}")
    if problems:
        raise ValueError(f"{source}: checkpoint does not fit {type(model).__name__}; "
                         + "; ".join(problems))
    by_file: dict[str, list[str]] = {}
    for k in expected:
        by_file.setdefault(found[renames.get(k, k)][0], []).append(k)
    for path, keys in by_file.items():
        with safe_open(path, framework="flax") as f:
            for k in keys:
                var = expected[k]
                var.set_value(jnp.asarray(f.get_tensor(renames.get(k, k)), dtype=var.dtype))
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
    """Load a checkpoint of a family in :data:`FAMILIES` (Llama, Mistral, Qwen2, T5, GPT-2,
    GPT-NeoX, Gemma 3; Hugging Face or GGUF) as a Flax NNX model.

    Args:
      name_or_path: a local Hugging Face model directory; a Hub repository name (needs network);
        or a GGUF checkpoint: a ``.gguf`` file, or a directory with exactly one ``.gguf`` and no
        config.json (architectures llama, qwen2, gemma3; needs ``pip install -e ".[gguf]"``). A GGUF is
        dequantised to float32 by transformers once and cached as a Hugging Face directory
        (``<stem>.hf/`` next to it; see ``jaxgrad.models.gguf``), rebuilt when the file changes.
        Its config.json records the GGUF's quantisation under ``"gguf_source"``.
      dtype: compute dtype, ``float32`` (default) or ``bfloat16``, as a name or a numpy/JAX
        dtype; anything else (float16, float64, integer or torch dtypes) raises ValueError.
      param_dtype: storage dtype of the base weights (default float32; LoRA weights are float32),
        same choices as ``dtype``.
      lora: attach LoRA adapters with this config (B = 0: outputs unchanged).
      revision: Hub revision.
      with_tokenizer: load the tokenizer as well.
      gguf_cache_dir: where converted GGUFs go (default ``$JAXGRAD_GGUF_CACHE``, else next to
        the file).

    Returns:
      ``(model, tokenizer)``; tokenizer is None when the checkpoint has no tokenizer.

    Raises:
      FileNotFoundError: no such directory or file; a directory with neither config.json nor .gguf.
      ValueError: unsupported architecture, dtype or config value (naming the config file, the
        key and its value; docs/config_fields.md), tensors that do not fit; for GGUF also a
        corrupt or truncated file, or a directory with several .gguf files.
      ImportError: a GGUF without the ``gguf`` extra (gguf, accelerate, torch) installed.
      OSError: a Hub name while offline.

    Example (needs a checkpoint, so not run as a doctest)::

      model, tok = load_pretrained("tests/fixtures/tiny-llama", lora=LoraConfig(rank=4))
      logits = model(input_ids, attention_mask)                     # [B, L, V] float32
      model, tok = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")
    """
    dtype = resolve_dtype(dtype, "dtype")  # refused before any download or conversion
    param_dtype = resolve_dtype(jnp.float32 if param_dtype is None else param_dtype, "param_dtype")
    directory = resolve_checkpoint(name_or_path, revision=revision, gguf_cache_dir=gguf_cache_dir)
    hf = read_config(directory)
    config = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype,
                            source=os.path.join(directory, "config.json"))
    files = _weight_files(directory)
    found = tensor_index(files)
    prefix = prefix_renames(model_class(config), found)  # ours -> checkpoint
    ours = {v: k for k, v in prefix.items()}
    index = {ours.get(k, k): (f, shape, k) for k, (f, shape) in found.items()}
    config, renames, aliases = resolve_tying(config, index, source=directory)
    renames = {k: prefix.get(v, v) for k, v in renames.items()}
    renames.update({k: v for k, v in prefix.items() if k not in renames})
    aliases = {prefix.get(a, a) for a in aliases}
    # eval_shape leaves ShapeDtypeStructs; load_weights replaces every one with its tensor.
    model = nnx.eval_shape(lambda: build_model(config))
    load_weights(model, files, source=directory, renames=renames, aliases=aliases)
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

    Args:
      model: the NNX model; every non-LoRA variable is written as float32, by its Hugging Face
        name, to ``model.safetensors`` (one file, ``{"format": "pt"}`` metadata).
      directory: the output directory (created if needed; files there are overwritten).
      hf_config: written as ``config.json``.
      tokenizer: if given, saved with its ``save_pretrained(directory)``.

    Raises:
      OSError: the directory or files cannot be written. ImportError: no ``safetensors``.
    """
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {k: np.asarray(v[...], np.float32) for k, v in named_variables(model).items()
               if not isinstance(v, nnx.LoRAParam)}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
