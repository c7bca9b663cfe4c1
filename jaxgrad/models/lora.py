r"""LoRA adapters by model surgery, base/adapter split, and PEFT-format import/export.

Which layers get an adapter
---------------------------
``apply_lora(model, LoraConfig(...))`` attaches an adapter to every
:class:`~jaxgrad.models.layers.Linear` whose dotted module path (the Hugging Face name, e.g.
``model.layers.0.self_attn.q_proj``) peft would select (peft ``check_target_module_exists``):

- ``exclude_modules`` (names, the rule below) or ``exclude_regex`` (``re.fullmatch``) drop a path.
- ``target_modules`` names: a name selects the path equal to it or ending in ``"." + name``, so
  ``q_proj``, ``self_attn.q_proj`` and ``model.layers.0.self_attn.q_proj`` all work, and ``q`` in
  T5 matches self- and cross-attention. ``None``: the paper's defaults, the attention's q, k, v
  (the model class's ``LORA_TARGETS``: ``q_proj, k_proj, v_proj``; T5 ``q, k, v``; the fused
  ``c_attn`` of GPT-2 and ``query_key_value`` of GPT-NeoX).
  ``("all-linear",)``: every linear layer but the output head ``lm_head``.
- ``target_regex``: peft's *string* ``target_modules``, ``re.fullmatch`` over the full path.
- ``layers_to_transform``: keep a suffix-matched path only if its layer index (the number after
  the first ``.<layers_pattern>.`` of the path; after the first ``.<anything>.`` when
  ``layers_pattern`` is empty) is listed. As in peft, a name equal to the full path is kept.
- ``rank_pattern`` / ``alpha_pattern``: ordered ``(key, value)`` pairs; the first ``key`` with
  ``re.match(rf"(.*\.)?({key})$", path)`` gives that module's rank / alpha (peft ``get_pattern_key``).

The update is ``scaling · B A`` with ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
``use_rslora``), per module. ``lora_A`` is Kaiming-uniform and ``lora_B`` zero (peft's
``init_lora_weights=True``), so a new adapter computes exactly what the base model did.

Adapter weights are ``nnx.LoRAParam`` variables, so the standard NNX filters separate them:
``graphdef, adapters, base = split_lora(model)`` and ``merge_lora(graphdef, adapters, base)``.
The adapter state is what meta-training optimises and what per-sample gradients differentiate.

PEFT interchange
----------------
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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrad.config import LoraSection
from jaxgrad.models.layers import Linear, lora_scaling, named_variables

# Each model class names its own defaults (class attributes, so a new family needs no edit here):
#   LORA_TARGETS  jaxgrad's default, the paper's: the attention's query, key and value
#                 projections (the fused q/k/v layer where the family has one);
#   PEFT_TARGETS  peft's default when an adapter_config.json has no target_modules
#                 (peft TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING);
#   OUTPUT_HEAD   the output head's module path, which "all-linear" leaves out (peft
#                 ``_maybe_include_all_linear_layers`` drops ``get_output_embeddings()``).
PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
OUTPUT_HEAD = "lm_head"

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


def _names(value) -> tuple[str, ...] | None:
    """None, a comma-separated string or a sequence of names -> a tuple of names (or None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(t.strip() for t in value.split(",") if t.strip())
    return tuple(str(t) for t in value)


def _pairs(value, cast) -> tuple[tuple[str, Any], ...]:
    """A mapping (or sequence of pairs) -> ordered ``(str key, cast(value))`` pairs."""
    items = value.items() if hasattr(value, "items") else (value or ())
    return tuple((str(k), cast(v)) for k, v in items)


def _is_off(value) -> bool:
    """Whether a config value leaves its feature off: null, false or empty."""
    return value is None or value is False or (isinstance(value, (str, list, dict, tuple)) and not value)


@dataclasses.dataclass(frozen=True)
class LoraConfig(LoraSection):
    r"""LoRA hyper-parameters (peft's fields jaxgrad honours, same rules); the config's ``lora``.

    The fields and their defaults are declared by :class:`jaxgrad.config.LoraSection` (the one
    source of the ``lora`` section's defaults); this class adds their checks and peft's rules.

    Attributes:
      rank: r, the adapter rank (default for modules ``rank_pattern`` does not name).
      alpha: scaling numerator; the update is (alpha / rank) · B A (alpha / sqrt(rank) with
        ``use_rslora``).
      dropout: dropout on the adapter input during training (0 disables).
      target_modules: names of the linear layers to adapt (a comma-separated string is split): a
        name matches the path equal to it or ending in ``"." + name``; None = the paper's defaults
        (``q,k,v`` for T5, ``q_proj,k_proj,v_proj`` for Llama); ``("all-linear",)`` = every linear
        layer but ``lm_head``.
      seed: seed of the ``lora_A`` initialisation.
      target_regex: instead of ``target_modules``: a regex, ``re.fullmatch`` over the full path.
      exclude_modules / exclude_regex: paths never adapted (names as above / fullmatch regex).
      layers_to_transform: layer indices to adapt (suffix-matched names only, as in peft).
      layers_pattern: names of the layer lists (``layers``, ``block``) where the index is read.
      rank_pattern / alpha_pattern: ``{key: rank}`` / ``{key: alpha}``, first key with
        ``re.match(rf"(.*\.)?({key})$", path)`` wins; stored as ordered pairs.
      use_rslora: scaling ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.

    Raises:
      ValueError: non-positive rank, dropout outside [0, 1), or a combination peft refuses
        (both target forms, ``layers_*`` with a regex or all-linear, ``layers_pattern`` alone).
    """

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("target_modules", _names(self.target_modules) or None)
        put("target_regex", self.target_regex or None)  # "" (an unset config string): none
        put("exclude_regex", self.exclude_regex or None)
        put("exclude_modules", _names(self.exclude_modules) or None)
        put("layers_pattern", _names(self.layers_pattern) or None)
        layers = self.layers_to_transform
        put("layers_to_transform", None if layers is None else
            (int(layers),) if isinstance(layers, int) else tuple(int(i) for i in layers) or None)
        put("rank_pattern", _pairs(self.rank_pattern, int))
        put("alpha_pattern", _pairs(self.alpha_pattern, float))
        put("use_rslora", bool(self.use_rslora))
        if int(self.rank) <= 0 or any(r <= 0 for _, r in self.rank_pattern):
            raise ValueError(f"LoraConfig: ranks must be positive integers, got rank={self.rank!r}, "
                             f"rank_pattern={dict(self.rank_pattern)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_regex is not None and self.target_modules is not None:
            raise ValueError("LoraConfig: give target_modules (names) or target_regex, not both")
        whole = self.target_regex is not None or self.all_linear
        if whole and (self.layers_to_transform or self.layers_pattern):
            raise ValueError("LoraConfig: layers_to_transform / layers_pattern cannot be used with "
                             "target_regex or all-linear (peft refuses the same)")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("LoraConfig: layers_pattern needs layers_to_transform")

    @property
    def all_linear(self) -> bool:
        return self.target_modules is not None and [t.lower() for t in self.target_modules] == [ALL_LINEAR]

    @property
    def scaling(self) -> float:
        """The scaling of a module at the default rank and alpha."""
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    def rank_for(self, path: str) -> int:
        return int(_pattern_value(self.rank_pattern, path, self.rank))

    def alpha_for(self, path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, path, self.alpha))

    def selects(self, path: str, targets: tuple[str, ...] | None = None,
                modules_to_save: tuple[str, ...] = (), head: str = OUTPUT_HEAD) -> bool:
        """Whether the module at ``path`` gets an adapter, by peft's rules (module docstring).

        ``targets`` replaces ``target_modules`` (:func:`select_modules` passes the family's
        defaults when it is None); ``modules_to_save`` names modules peft keeps whole, which are
        never adapted; ``head`` is the output head's path, which "all-linear" leaves out.
        """
        if self.exclude_regex is not None and re.fullmatch(self.exclude_regex, path):
            return False
        if self.exclude_modules and _name_matches(self.exclude_modules, path):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in modules_to_save):
            return False
        if self.target_regex is not None:
            return re.fullmatch(self.target_regex, path) is not None
        targets = (self.target_modules or ()) if targets is None else targets
        if [t.lower() for t in targets] == [ALL_LINEAR]:
            return path != head
        if path in targets:
            return True
        if not _name_matches(targets, path):
            return False
        if not self.layers_to_transform:
            return True
        index = _layer_index(path, self.layers_pattern)
        return index is not None and index in self.layers_to_transform


def _name_matches(names, path: str) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def _layer_index(path: str, patterns: tuple[str, ...] | None) -> int | None:
    """peft's layer index of a module path: the first number after ``.<pattern>.``."""
    for pattern in patterns or (None,):
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\." if pattern is None else
                     rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
        if m:
            return int(m.group("idx"))
    return None


def _pattern_value(pattern, path: str, default):
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _family_attr(model: nnx.Module, name: str):
    value = getattr(type(model), name, None)
    if value is None:
        raise TypeError(f"{type(model).__name__} declares no {name} (a jaxgrad model class "
                        "names its LoRA defaults: LORA_TARGETS, PEFT_TARGETS, OUTPUT_HEAD)")
    return value


def default_targets(model: nnx.Module, *, peft: bool = False) -> tuple[str, ...]:
    """The model family's default ``target_modules``: jaxgrad's (the paper's q, k, v) or, with
    ``peft=True``, peft's own (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``)."""
    return tuple(_family_attr(model, "PEFT_TARGETS" if peft else "LORA_TARGETS"))


def output_head(model: nnx.Module) -> str:
    """Module path of the output head ("all-linear" leaves it out): ``lm_head``, ``embed_out``."""
    return str(_family_attr(model, "OUTPUT_HEAD"))


def resolve_targets(model: nnx.Module, cfg: LoraConfig) -> tuple[str, ...]:
    return tuple(cfg.target_modules) if cfg.target_modules else default_targets(model)


def linear_modules(model: nnx.Module) -> dict[str, Linear]:
    """Every :class:`Linear` in ``model`` by dotted module path."""
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, Linear)}


def select_modules(model: nnx.Module, cfg: LoraConfig, *, strict: bool = True,
                   modules_to_save: tuple[str, ...] = (),
                   targets: tuple[str, ...] | None = None) -> dict[str, Linear]:
    """The linear layers ``cfg`` adapts, by path (sorted).

    Raises:
      ValueError: nothing is selected; with ``strict``, also a target name that matches no
        linear layer (the message lists the names that exist).
    """
    linears = linear_modules(model)
    if targets is None and cfg.target_regex is None:
        targets = resolve_targets(model, cfg)
    if strict and cfg.target_regex is None and not cfg.all_linear:
        unknown = [t for t in targets if not any(_name_matches((t,), p) for p in linears)]
        if unknown:
            available = sorted({p.rsplit(".", 1)[-1] for p in linears})
            raise ValueError(f"LoRA target_modules {unknown} match no linear layer of this "
                             f"{type(model).__name__}; available names: {available}")
    chosen = {p: linears[p] for p in sorted(linears)
              if cfg.selects(p, targets, modules_to_save, output_head(model))}
    if not chosen:
        what = (f"target_regex {cfg.target_regex!r}" if cfg.target_regex is not None
                else f"target_modules {list(targets)}")
        raise ValueError(f"LoRA {what} (with exclude_modules={cfg.exclude_modules}, "
                         f"exclude_regex={cfg.exclude_regex!r}, layers_to_transform="
                         f"{cfg.layers_to_transform}) select no linear layer of this "
                         f"{type(model).__name__}")
    return chosen


def apply_lora(model: nnx.Module, cfg: LoraConfig) -> nnx.Module:
    """Attach LoRA adapters in place to the linear layers ``cfg`` selects; returns ``model``.

    Ranks and alphas are per module (``rank_pattern`` / ``alpha_pattern``); ``lora_A [r, in]`` and
    ``lora_B [out, r]`` are float32.

    Raises:
      ValueError: a target name matches no linear layer (the message lists the names that exist),
        nothing is selected, or the model already has adapters.
    """
    _attach(model, cfg, select_modules(model, cfg))
    return model


def _attach(model: nnx.Module, cfg: LoraConfig, chosen: dict[str, Linear]) -> None:
    rngs = nnx.Rngs(params=cfg.seed)
    for path, lin in chosen.items():
        if lin.lora_A is not None:
            raise ValueError(f"apply_lora: {path} already has a LoRA adapter")
        lin.add_lora(cfg.rank_for(path), cfg.alpha_for(path), cfg.dropout, rngs,
                     use_rslora=cfg.use_rslora)


def split_lora(model: nnx.Module):
    """``(graphdef, adapters, base)``: adapter state (``nnx.LoRAParam``) and everything else."""
    return nnx.split(model, nnx.LoRAParam, ...)


def merge_lora(graphdef, adapters, base) -> nnx.Module:
    return nnx.merge(graphdef, adapters, base)


def lora_state(model: nnx.Module) -> nnx.State:
    return nnx.state(model, nnx.LoRAParam)


def num_params(state_or_model: Any) -> int:
    """Number of scalars in a model or state (e.g. ``num_params(lora_state(model))``)."""
    state = nnx.state(state_or_model) if isinstance(state_or_model, nnx.Module) else state_or_model
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(state)))


def trainable_summary(model: nnx.Module) -> dict[str, int | float]:
    lora = num_params(lora_state(model))
    total = num_params(model)
    return {"lora_params": lora, "total_params": total, "lora_fraction": lora / max(total, 1)}


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

    Raises:
      ValueError: as :func:`lora_config_of`.
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
        "task_type": "SEQ_2_SEQ_LM" if getattr(model, "is_encoder_decoder", False) else "CAUSAL_LM",
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
        if key in _PEFT_REFUSED and not _is_off(value):
            raise ValueError(f"{path}: {key}={value!r} ({_PEFT_REFUSED[key]}) is not supported by "
                             "jaxgrad; it would change what the adapter computes")
        if key not in _PEFT_REFUSED and key not in _PEFT_ACCEPTED and not _is_off(value):
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
    mts = tuple(_names(raw.get("modules_to_save")) or ())
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


def load_peft_adapter(model: nnx.Module, directory: str | os.PathLike) -> nnx.Module:
    """Attach (if needed) and fill adapters from a PEFT directory; returns ``model``.

    Selection, per-module rank / alpha, rsLoRA, ``modules_to_save`` and ``bias`` follow the
    module docstring (peft's rules). A model that already has adapters keeps them (and their
    dropout); their alphas are set from the file. Nothing is changed when an error is raised.

    Raises:
      FileNotFoundError: no ``adapter_config.json`` or ``adapter_model.safetensors``.
      ValueError: a refused config field (named, with the file); adapter tensors of embedding
        layers; tensors the model has no place for or that no field explains; adapted layers the
        file does not cover; mis-shaped tensors (each listed).
    """
    from safetensors.numpy import load_file

    cfg, raw, cfg_path = _read_peft_file(directory)
    path = os.path.join(directory, "adapter_model.safetensors")
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
    plan = _base_tensor_plan(model, {k: v for k, v in tensors.items() if k not in lora}, raw, path,
                             cfg_path)

    mts = tuple(_names(raw.get("modules_to_save")) or ())
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
        _attach(model, cfg, chosen)
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
