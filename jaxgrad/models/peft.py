r"""PEFT-format adapters: jaxgrad's LoRA adapters saved for, and loaded from, Hugging Face peft.

:func:`save_peft_adapter` writes ``adapter_config.json`` and ``adapter_model.safetensors`` with
peft's key names (``base_model.model.<module path>.lora_A.weight``) so that
``peft.PeftModel.from_pretrained`` rebuilds the same model on the torch side (per-module ranks and
alphas become ``rank_pattern`` / ``alpha_pattern`` keyed by the escaped full path).
:func:`load_peft_adapter` reads adapters saved by peft. Every ``adapter_config.json`` field that
changes what the adapter computes is honoured exactly or refused with a ``ValueError`` naming the
field and the file:

Honoured
  ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``: per-module rank and
  scaling as above.
  ``target_modules`` (list of names / dotted suffixes / full paths, which is also what peft saves
  for ``"all-linear"``; a regex string; ``"all-linear"``; null: peft's default for the family,
  ``q_proj, v_proj`` or ``q, v``), ``exclude_modules`` (list or regex string),
  ``layers_to_transform``, ``layers_pattern``: layer selection as above.
  ``modules_to_save``: the file carries those whole modules (peft: a module whose path ends with
  the name); their tensors replace the base weights (plain ``nnx.Param``: jaxgrad does not train
  them) and the modules get no adapter (peft: no path matching ``(^|.*\.)name($|\..*)``).
  Refused for a tied input embedding / output head, which jaxgrad stores once.
  ``bias``: ``"none"``; ``"all"`` / ``"lora_only"``: the bias tensors saved in the file replace
  the base ones. Such base tensors are recorded as ``model.peft_base_tensors``
  (:class:`PeftBaseTensors`) and written back by :func:`save_peft_adapter`; a tensor that neither
  field explains is refused.
  ``lora_dropout``: dropout on the adapter input in training (no effect on evaluation).
  ``fan_in_fan_out``: peft resets it to false for ``torch.nn.Linear`` and to true for
  transformers' ``Conv1D`` (GPT-2), whatever the file says; jaxgrad's ``Linear(transposed=True)``
  is that Conv1D layout and its A/B tensors are the same as for ``nn.Linear``. It only says how
  peft merges the delta into a stored weight: no effect on what the adapter computes. Exported
  files say true exactly when an adapted layer is a Conv1D.
  ``init_lora_weights``: ``true``, ``false``, ``"gaussian"``, ``"orthogonal"``, ``"eva"`` only
  initialise A and B, which the file overwrites: no effect. ``loftq_config``, ``eva_config``,
  ``corda_config``, ``lora_ga_config`` are read only by their ``init_lora_weights``: ignored.
  ``ensure_weight_tying`` acts only on a tied embedding or head in ``modules_to_save`` or
  ``target_modules``, which jaxgrad refuses anyway: ignored.
Metadata (accepted)
  ``peft_type`` (must be ``"LORA"``), ``task_type``, ``base_model_name_or_path``, ``revision``,
  ``inference_mode``, ``auto_mapping``, ``peft_version``, ``megatron_core``, ``qalora_group_size``,
  ``runtime_config``.
Refused unless off (null, false, empty)
  ``use_dora``, ``lora_bias``, ``layer_replication``, ``megatron_config``,
  ``trainable_token_indices``, ``target_parameters``, ``alora_invocation_tokens``, ``use_qalora``,
  ``use_bdlora``, ``arrow_config``, ``kasa_config``, ``velora_config``, ``monteclora_config``, any
  other ``init_lora_weights`` (``pissa*``, ``olora``, ``corda``, ``mica``, ``loftq``,
  ``lora_ga``: they rewrite the base weights) and any field jaxgrad does not know. Adapter tensors
  of embedding layers (``lora_embedding_A``: ``target_modules`` naming an embedding) are refused
  naming ``target_modules``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrad.models.forward import is_encoder_decoder
from jaxgrad.models.layers import named_variables
from jaxgrad.models.lora import (ALL_LINEAR, LoraConfig, as_names, attach_adapters, default_targets,
                                 is_off, linear_modules, output_head, select_modules)


# Each model class names its own defaults (class attributes, so a new family needs no edit here):
#   LORA_TARGETS  jaxgrad's default, the paper's: the attention's query, key and value
#                 projections (the fused q/k/v layer where the family has one);
#   PEFT_TARGETS  peft's default when an adapter_config.json has no target_modules
#                 (peft TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING);
#   OUTPUT_HEAD   the output head's module path, which "all-linear" leaves out (peft
#                 ``_maybe_include_all_linear_layers`` drops ``get_output_embeddings()``).
PEFT_PREFIX = "base_model.model."


# adapter_config.json fields jaxgrad honours or ignores as metadata (see the module docstring).
_PEFT_ACCEPTED = {
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "bias",
    "lora_dropout", "fan_in_fan_out", "init_lora_weights", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "ensure_weight_tying",
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "runtime_config"}


# ... and those it refuses unless off, with what they would add.
_PEFT_REFUSED = {"use_dora": "DoRA (weight-decomposed LoRA)",
                 "lora_bias": "a bias on lora_B",
                 "layer_replication": "replicated decoder layers",
                 "megatron_config": "Megatron parallel layers",
                 "trainable_token_indices": "trainable token embeddings",
                 "target_parameters": "adapters on bare parameters",
                 "alora_invocation_tokens": "activated LoRA (aLoRA)",
                 "use_qalora": "QALoRA",
                 "use_bdlora": "block-diagonal LoRA",
                 "arrow_config": "Arrow routing",
                 "kasa_config": "KaSA",
                 "velora_config": "VeLoRA",
                 "monteclora_config": "MonteCLoRA"}


_LOAD_ONLY_INITS = (True, False, "gaussian", "orthogonal", "eva")


def adapter_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """Adapter weights under PEFT key names, as float32 numpy arrays."""
    out = {}
    for path, lin in linear_modules(model).items():
        if lin.lora_A is not None:
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = np.asarray(lin.lora_A[...], np.float32)
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = np.asarray(lin.lora_B[...], np.float32)
    return out


@dataclasses.dataclass(frozen=True)
class PeftBaseTensors:
    """Whole base tensors an adapter file carried (``modules_to_save``, ``bias``), kept on the
    model as ``model.peft_base_tensors`` so that :func:`save_peft_adapter` writes them back.

    Attributes:
      modules_to_save: peft's ``modules_to_save`` names (empty: none).
      bias: peft's ``bias`` (``"none"``, ``"all"``, ``"lora_only"``).
      keys: ``(peft key without the base_model.model. prefix, jaxgrad variable name)`` pairs.
    """

    modules_to_save: tuple[str, ...] = ()
    bias: str = "none"
    keys: tuple[tuple[str, str], ...] = ()


def _most_common(values: list) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def lora_config_of(model: nnx.Module) -> LoraConfig:
    """The LoraConfig that recreates the adapters present on ``model``, layer for layer.

    ``rank`` / ``alpha`` are the most common ones, other modules go to ``rank_pattern`` /
    ``alpha_pattern`` keyed by their escaped full path; ``target_modules`` are the layer names
    when those select exactly the adapted layers, else the full paths.

    Raises:
      ValueError: the model has no adapters, or mixes rsLoRA and plain scaling.
    """
    adapted = {p: l for p, l in linear_modules(model).items() if l.lora_A is not None}
    if not adapted:
        raise ValueError("model has no LoRA adapters (call apply_lora first)")
    if len({l.lora_rslora for l in adapted.values()}) > 1:
        raise ValueError("model mixes rsLoRA and plain LoRA scaling; one adapter config cannot say so")
    ranks = {p: int(l.lora_A.shape[0]) for p, l in adapted.items()}
    alphas = {p: float(l.lora_alpha) for p, l in adapted.items()}
    rank, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    first = next(iter(adapted.values()))
    base = _base_tensors(model) or PeftBaseTensors()
    names = tuple(sorted({p.rsplit(".", 1)[-1] for p in adapted}))
    common = dict(rank=rank, alpha=alpha, dropout=first.lora_dropout, use_rslora=first.lora_rslora,
                  rank_pattern=[(re.escape(p), r) for p, r in ranks.items() if r != rank],
                  alpha_pattern=[(re.escape(p), a) for p, a in alphas.items() if a != alpha])
    cfg = LoraConfig(target_modules=names, **common)
    linears = linear_modules(model)
    if {p for p in linears if cfg.selects(p, modules_to_save=base.modules_to_save,
                                                 head=output_head(model))} != set(adapted):
        cfg = LoraConfig(target_modules=tuple(sorted(adapted)), **common)
    return cfg


def _base_tensors(model: nnx.Module) -> PeftBaseTensors | None:
    return getattr(model, "peft_base_tensors", None)


def save_peft_adapter(model: nnx.Module, directory: str | os.PathLike, *,
                      base_model_name_or_path: str | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format.

    Per-module ranks / alphas are written as ``rank_pattern`` / ``alpha_pattern``, base tensors
    loaded from a peft file (``modules_to_save``, ``bias``) are written back under their keys.
    Tensors are float32; the files load with peft's ``PeftModel.from_pretrained``.

    Args:
      model: an NNX model with LoRA adapters.
      directory: the output directory (created if needed; the two files are overwritten).
      base_model_name_or_path: recorded as peft's ``base_model_name_or_path``.

    Raises:
      ValueError: as :func:`lora_config_of`; an adapter on the output head whose name differs
        in peft's model (``PEFT_OUTPUT_HEAD``).
    """
    from safetensors.numpy import save_file

    cfg = lora_config_of(model)
    base = _base_tensors(model) or PeftBaseTensors()
    head, peft_head = output_head(model), getattr(type(model), "PEFT_OUTPUT_HEAD", None)
    if peft_head and peft_head != head and any(
            p == head and lin.lora_A is not None for p, lin in linear_modules(model).items()):
        raise ValueError(f"save_peft_adapter: {type(model).__name__} has an adapter on its output "
                         f"head {head!r}, which peft's model calls {peft_head!r}: peft could not "
                         "place it; leave the head out of target_modules to exchange adapters")
    os.makedirs(directory, exist_ok=True)
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if is_encoder_decoder(model) else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "use_rslora": cfg.use_rslora,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "bias": base.bias,
        "modules_to_save": list(base.modules_to_save) or None,
        # peft sets it for transformers' Conv1D (GPT-2) and warns when it is missing
        "fan_in_fan_out": any(lin.transposed for lin in linear_modules(model).values()
                              if lin.lora_A is not None),
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
    }
    tensors = adapter_tensors(model)
    variables = named_variables(model)
    for key, name in base.keys:
        tensors[PEFT_PREFIX + key] = np.asarray(variables[name][...], np.float32)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(peft_cfg, f, indent=2)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))


def _read_peft_file(directory) -> tuple[LoraConfig, dict, str]:
    """``(LoraConfig, raw json, path)`` of ``adapter_config.json``; refused fields raise."""
    path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no PEFT adapter config at {path}")
    with open(path) as f:
        raw = json.load(f)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    for key, value in raw.items():
        if key in _PEFT_REFUSED and not is_off(value):
            raise ValueError(f"{path}: {key}={value!r} ({_PEFT_REFUSED[key]}) is not supported by "
                             "jaxgrad; it would change what the adapter computes")
        if key not in _PEFT_REFUSED and key not in _PEFT_ACCEPTED and not is_off(value):
            raise ValueError(f"{path}: unknown field {key}={value!r}; jaxgrad cannot tell whether it "
                             "changes what the adapter computes, so it refuses the adapter")
    init = raw.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and isinstance(init, str) and init.lower() == v)
               for v in _LOAD_ONLY_INITS):
        raise ValueError(f"{path}: init_lora_weights={init!r} is not supported by jaxgrad: it "
                         "rewrites the base weights (or is unknown); only true, false, 'gaussian', "
                         "'orthogonal' and 'eva' adapters load exactly")
    bias = raw.get("bias") or "none"
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"{path}: bias={bias!r} is not one of 'none', 'all', 'lora_only'")
    targets, exclude = raw.get("target_modules"), raw.get("exclude_modules")
    regex = targets if isinstance(targets, str) and targets.lower() != ALL_LINEAR else None
    try:
        cfg = LoraConfig(
            rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
            dropout=float(raw.get("lora_dropout") or 0.0),
            target_modules=None if regex is not None or targets is None else
            (targets,) if isinstance(targets, str) else tuple(targets),
            target_regex=regex,
            exclude_modules=None if isinstance(exclude, str) else exclude,
            exclude_regex=exclude if isinstance(exclude, str) else None,
            layers_to_transform=raw.get("layers_to_transform"),
            layers_pattern=raw.get("layers_pattern"),
            rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
            use_rslora=bool(raw.get("use_rslora", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid LoRA config: {e}") from e
    return cfg, raw, path


def read_peft_config(directory: str | os.PathLike) -> LoraConfig:
    """The :class:`LoraConfig` of a peft ``adapter_config.json`` (see the module docstring).

    ``modules_to_save`` and ``bias`` are not part of it (:func:`load_peft_adapter` reads them), and
    a file without ``target_modules`` gives ``target_modules=None``, which :func:`apply_lora` reads
    as jaxgrad's defaults while peft (and :func:`load_peft_adapter`) use ``PEFT_DEFAULT_TARGETS``.

    Raises:
      FileNotFoundError: no ``adapter_config.json``.
      ValueError: a field jaxgrad refuses (named, with the file).
    """
    return _read_peft_file(directory)[0]


def _base_tensor_plan(model, tensors: dict, raw: dict, path: str,
                      cfg_path: str) -> dict[str, tuple[str, nnx.Variable]]:
    """Non-LoRA tensors of the file: ``{file key: (variable name, variable)}``.

    Each must be explained by ``modules_to_save`` (its module path ends with a listed name, the
    rule of peft ``_set_trainable``) or by ``bias`` (a bias tensor with ``bias`` not "none"), and
    must have a model variable of the same shape that is not a tied embedding.
    """
    mts = tuple(as_names(raw.get("modules_to_save")) or ())
    bias = raw.get("bias") or "none"
    variables = named_variables(model)
    tied = set()
    if getattr(model, output_head(model), 0) is None:
        tied = {f"{output_head(model)}.weight", *getattr(type(model), "EMBED_KEYS", ())}
    plan, unexplained, bad = {}, [], []
    for key, value in tensors.items():
        name = key.replace(".base_layer.", ".")
        parts = name.split(".")
        owners = [".".join(parts[:i]) for i in range(1, len(parts))]
        saved = any(o.endswith(m) for o in owners for m in mts)
        if not saved and not (bias != "none" and "bias" in name):
            unexplained.append(key)
            continue
        field = "modules_to_save" if saved else "bias"
        var = variables.get(name)
        if name in tied:
            bad.append(f"{key} ({field}: this {type(model).__name__} ties its output head to the "
                       "input embedding, which peft's copy unties)")
        elif var is None or isinstance(var, nnx.LoRAParam):
            bad.append(f"{key} ({field}: no such tensor in this {type(model).__name__})")
        elif tuple(var.shape) != tuple(value.shape):
            bad.append(f"{key} ({field}: file {value.shape} vs model {tuple(var.shape)})")
        else:
            plan[key] = (name, var)
    if unexplained:
        raise ValueError(f"{path}: tensors that are no LoRA weights and that neither "
                         f"modules_to_save={list(mts)} nor bias={bias!r} of {cfg_path} explain: "
                         f"{unexplained[:10]}")
    if bad:
        raise ValueError(f"{cfg_path}: tensors of adapter_model.safetensors that jaxgrad cannot "
                         f"place: {bad[:10]}")
    return plan


def _read_adapter_tensors(path: str, raw: dict, cfg_path: str) -> tuple[dict, dict]:
    """``(tensors, lora)`` of ``adapter_model.safetensors``: every tensor by its module path (the
    ``base_model.model.`` prefix and peft's adapter name ``default`` taken off), and the LoRA A/B
    weights among them. Raises FileNotFoundError without the file, ValueError for tensors outside
    the prefix, embedding adapters and LoRA variants jaxgrad does not compute."""
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no PEFT adapter weights at {path}")
    # peft may save keys with the adapter name ("...lora_A.default.weight"); normalise.
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in load_file(path).items()}
    outside = [k for k in tensors if not k.startswith(PEFT_PREFIX)]
    if outside:
        raise ValueError(f"{path}: tensors outside {PEFT_PREFIX!r}: {outside[:10]}")
    tensors = {k[len(PEFT_PREFIX):]: v for k, v in tensors.items()}
    embedding = sorted(k for k in tensors if "lora_embedding_" in k)
    if embedding:
        raise ValueError(f"{cfg_path}: target_modules={raw.get('target_modules')} adapt embedding "
                         f"layers ({embedding[:4]}); jaxgrad adapts linear layers only")
    lora = {k: v for k, v in tensors.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    other_lora = sorted(k for k in tensors if "lora_" in k and k not in lora)
    if other_lora:
        raise ValueError(f"{path}: adapter tensors of a LoRA variant jaxgrad does not support: "
                         f"{other_lora[:10]}")
    return tensors, lora


def load_peft_adapter(model: nnx.Module, directory: str | os.PathLike) -> nnx.Module:
    """Attach (if needed) and fill adapters from a PEFT directory; returns ``model``.

    Selection, per-module rank / alpha, rsLoRA, ``modules_to_save`` and ``bias`` follow the
    module docstring (peft's rules). A model that already has adapters keeps them (and their
    dropout); their alphas are set from the file. Nothing is changed when an error is raised.

    Args:
      model: the NNX base model (of the family the adapter was trained on), changed in place.
      directory: a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Raises:
      FileNotFoundError: no ``adapter_config.json`` or ``adapter_model.safetensors``.
      ValueError: a refused config field (named, with the file); adapter tensors of embedding
        layers; tensors the model has no place for or that no field explains; adapted layers the
        file does not cover; mis-shaped tensors (each listed).
    """
    cfg, raw, cfg_path = _read_peft_file(directory)
    path = os.path.join(directory, "adapter_model.safetensors")
    tensors, lora = _read_adapter_tensors(path, raw, cfg_path)
    plan = _base_tensor_plan(model, {k: v for k, v in tensors.items() if k not in lora}, raw, path,
                             cfg_path)

    mts = tuple(as_names(raw.get("modules_to_save")) or ())
    present = {p: l for p, l in linear_modules(model).items() if l.lora_A is not None}
    if present:
        chosen, attach = present, False
    else:
        defaults = None if raw.get("target_modules") else default_targets(model, peft=True)
        try:
            chosen = select_modules(model, cfg, strict=False, modules_to_save=mts, targets=defaults)
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}") from e
        attach = True
    ours = {f"{p}.lora_{ab}.weight": p for p in chosen for ab in "AB"}
    unexpected, missing = sorted(set(lora) - set(ours)), sorted(set(ours) - set(lora))
    if unexpected or missing:
        raise ValueError(
            f"{path}: adapter tensors do not match the layers that {cfg_path} selects "
            "(target_modules, exclude_modules, layers_to_transform, layers_pattern, "
            f"modules_to_save); unexpected: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            f"; missing: {missing[:10]}{' ...' if len(missing) > 10 else ''}")

    def expected_shape(key):
        p = ours[key]
        lin, r = chosen[p], (cfg.rank_for(p) if attach else int(chosen[p].lora_A.shape[0]))
        return (r, lin.in_features) if ".lora_A." in key else (lin.out_features, r)

    bad = [f"{k}: file {tuple(v.shape)} vs model {expected_shape(k)}" for k, v in lora.items()
           if tuple(v.shape) != expected_shape(k)]
    if bad:
        raise ValueError(f"{path}: mis-shaped adapter tensors (r={cfg.rank}, rank_pattern="
                         f"{dict(cfg.rank_pattern)} in {cfg_path}): {bad}")

    if attach:
        attach_adapters(model, cfg, chosen)
    for p, lin in chosen.items():
        lin.set_lora_alpha(cfg.alpha_for(p), cfg.use_rslora)
        for ab in "AB":
            var = getattr(lin, f"lora_{ab}")
            var[...] = jnp.asarray(lora[f"{p}.lora_{ab}.weight"], var[...].dtype)
    for key, (_, var) in plan.items():
        var[...] = jnp.asarray(tensors[key], var[...].dtype)
    if plan or mts:
        model.peft_base_tensors = PeftBaseTensors(
            modules_to_save=mts, bias=raw.get("bias") or "none",
            keys=tuple(sorted((k, name) for k, (name, _) in plan.items())))
    return model
